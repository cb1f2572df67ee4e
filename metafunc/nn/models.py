"""Reference models of the meta-learning literature, built with metafunc's exact norm layers.

Every model names its output layer ``head`` and everything else ``body`` or ``features``, so ANIL/BOIL select them
by the prefix ``"head"``.
"""

from __future__ import annotations

from typing import Literal, Sequence

from torch import Tensor, nn

from metafunc.nn.norm import BatchNorm, GroupNorm, LayerNorm

__all__ = ["mlp", "conv4", "MLP", "Conv4", "NormKind"]

NormKind = Literal["batch", "layer", "group", "none"]


def _norm(kind: str | None, features: int, spatial: bool) -> nn.Module:
    if kind in (None, "none"):
        return nn.Identity()
    if kind == "batch":
        return BatchNorm(features)
    if kind == "layer":
        return GroupNorm(1, features) if spatial else LayerNorm(features)
    if kind == "group":
        return GroupNorm(min(8, features) if features % min(8, features) == 0 else 1, features)
    raise ValueError(f"models: norm must be 'batch', 'layer', 'group' or 'none' (got {kind!r})")


class MLP(nn.Module):
    """A ReLU MLP ``body`` (Linear, optional norm, ReLU per hidden layer) and a linear ``head``; build it with :func:`mlp`.

    Example:
        >>> net = MLP(2, (16, 16), 3, norm="layer")
        >>> [name for name, _ in net.named_children()], net(torch.randn(4, 2)).shape
        (['body', 'head'], torch.Size([4, 3]))
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, norm: str | None):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _norm(norm, h, spatial=False), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])
        self.head = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def mlp(in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1,
        norm: NormKind = "none") -> MLP:
    """The MAML sinusoid network: 1 -> 40 -> 40 -> 1 with ReLU (``norm="layer"`` adds exact LayerNorm).

    Example:
        >>> net = mlp()
        >>> net(torch.randn(10, 1)).shape
        torch.Size([10, 1])
    """
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"mlp: {name} must be a positive int (got {v!r})")
    if any(not isinstance(h, int) or h < 1 for h in hidden):
        raise ValueError(f"mlp: hidden must be positive ints (got {tuple(hidden)})")
    return MLP(in_features, tuple(hidden), out_features, norm)


class Conv4(nn.Module):
    """Four blocks of 3x3 conv (``width`` filters), norm, ReLU, 2x2 max-pool; then a linear ``head``.

    Build it with :func:`conv4`; :meth:`embed` gives the flattened features before the head.

    Example:
        >>> net = Conv4(in_channels=1, ways=5, width=8, image_size=28, norm="batch")
        >>> net.embed(torch.randn(2, 1, 28, 28)).shape, net.feature_dim
        (torch.Size([2, 8]), 8)
    """

    def __init__(self, in_channels: int, ways: int, width: int, image_size: int, norm: str | None):
        super().__init__()
        blocks = []
        channels, size = in_channels, image_size
        for _ in range(4):
            blocks.append(nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), _norm(norm, width, spatial=True),
                                        nn.ReLU(), nn.MaxPool2d(2)))
            channels, size = width, size // 2
        self.features = nn.Sequential(*blocks)
        self.feature_dim = width * size * size
        self.head = nn.Linear(self.feature_dim, ways)

    def embed(self, x: Tensor) -> Tensor:
        """The flattened features before the head."""
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def conv4(ways: int = 5, *, in_channels: int = 1, width: int = 64, image_size: int = 28,
          norm: NormKind = "batch") -> Conv4:
    """The standard Conv-4 of MAML/ProtoNets: 28x28 (Omniglot, 1 channel) or 84x84 (miniImageNet, 3 channels).

    With 28x28 inputs the features are ``width`` values (1x1 spatial); with 84x84, ``width * 5 * 5``.

    Example:
        >>> net = conv4(ways=5, width=32, image_size=28)
        >>> net(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 5])
    """
    for name, v in (("ways", ways), ("in_channels", in_channels), ("width", width)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"conv4: {name} must be a positive int (got {v!r})")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"conv4: image_size must be an int >= 16 so four 2x2 pools leave a pixel (got {image_size!r})")
    return Conv4(in_channels, ways, width, image_size, norm)
