"""ResNet-18 (He et al., 2016) built from plain layers and metafunc's exact :class:`~metafunc.BatchNorm`.

Two variants share the residual body: ``"imagenet"`` (7x7 stride-2 stem and a 3x3 max-pool, for 224x224 inputs, the
memory-efficient MAML setting) and ``"small"`` (a 3x3 stride-1 stem and no pool, for 28x28 to 84x84 images on a
CPU). The output layer is named ``head``, so ANIL/BOIL select it by the prefix ``"head"``.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from metafunc.nn.norm import BatchNorm

__all__ = ["resnet18", "ResNet18", "BasicBlock", "RESNET_VARIANTS"]

RESNET_VARIANTS = ("imagenet", "small")
"""The stems :func:`resnet18` offers."""


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (1x1 projection when the shape changes).

    Example:
        >>> block = BasicBlock(4, 8, stride=2)  # halves the resolution; the shortcut is a 1x1 projection
        >>> block(torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 8, 4, 4])
        >>> type(BasicBlock(8, 8, stride=1).shortcut).__name__  # same shape: identity shortcut
        'Identity'
    """

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNorm(channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          BatchNorm(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """A stem, four stages of two :class:`BasicBlock` (widths ``w, 2w, 4w, 8w``), global average pooling and a
    linear ``head``. Build it with :func:`resnet18`, which checks the arguments.

    Example:
        >>> net = ResNet18(ways=5, in_channels=1, width=4, variant="small")
        >>> x = torch.randn(2, 1, 16, 16)
        >>> net(x).shape
        torch.Size([2, 5])
        >>> net.embed(x).shape, net.feature_dim
        (torch.Size([2, 32]), 32)
    """

    def __init__(self, ways: int, in_channels: int, width: int, variant: str):
        super().__init__()
        if variant == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                                      BatchNorm(width), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False),
                                      BatchNorm(width), nn.ReLU())
        stages = []
        channels = width
        for i, stride in enumerate((1, 2, 2, 2)):
            out = width * 2 ** i
            stages.append(nn.Sequential(BasicBlock(channels, out, stride), BasicBlock(out, out, 1)))
            channels = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = channels
        self.head = nn.Linear(channels, ways)

    def embed(self, x: Tensor) -> Tensor:
        """Globally pooled features before the head, shape ``(N, 8 * width)``."""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def resnet18(ways: int = 5, *, variant: Literal["imagenet", "small"] = "imagenet", width: int = 64,
             in_channels: int = 3) -> ResNet18:
    """ResNet-18 with metafunc's exact BatchNorm (per-batch statistics, exact second-order gradients under vmap).

    ``variant="imagenet"`` is the standard network for 224x224 inputs (11.7M parameters with 1000 classes, the same
    parameter count as torchvision's); ``variant="small"`` replaces the stem by a 3x3 stride-1 convolution without
    max-pool, for small images on a CPU. ``width`` scales every stage (64 is the standard network).

    Example:
        >>> net = resnet18(ways=5, variant="small", width=8)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 5])
    """
    for name, v in (("ways", ways), ("width", width), ("in_channels", in_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"resnet18: {name} must be a positive int (got {v!r})")
    if variant not in RESNET_VARIANTS:
        raise ValueError(f"resnet18: variant must be one of {', '.join(map(repr, RESNET_VARIANTS))} (got {variant!r}); "
                         "use 'imagenet' for 224x224 inputs and 'small' for small images")
    return ResNet18(ways, in_channels, width, variant)
