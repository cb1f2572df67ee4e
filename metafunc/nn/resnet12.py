"""ResNet-12, the backbone of the few-shot image benchmarks since TADAM and MetaOptNet (Lee et al., CVPR 2019), built
from plain layers and metafunc's exact :class:`~metafunc.BatchNorm`, so it gives exact second-order meta-gradients
under ``vmap``.

Four residual blocks of widths 64, 160, 320, 640; each block is three 3x3 convolutions (no bias), each followed by
BatchNorm and LeakyReLU(0.1) (the third's activation after the residual sum), with a 1x1 convolution + BatchNorm
shortcut, then a 2x2 max-pool. Global average pooling gives ``widths[-1]`` (640) features. An 84x84 input leaves
5x5 maps after the four pools, a 32x32 one 2x2. The optional classifier is named ``head`` (ANIL/BOIL select it by
that prefix); with ``ways=None`` the network is an encoder for metric learners.

Regularisation as in MetaOptNet, off by default: with ``drop_rate > 0`` the first two blocks apply dropout and the
last two DropBlock (Ghiasi et al., 2018; ``block_size`` 5) to their output, in training mode only. Both draw random
numbers, which ``meta_batch(..., mode="vmap")`` refuses (it cannot give each task its own draw): train with
``mode="loop"`` or call ``module.eval()``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metafunc.nn.norm import BatchNorm

__all__ = ["resnet12", "ResNet12", "ResNet12Block", "DropBlock", "RESNET12_WIDTHS"]

RESNET12_WIDTHS = (64, 160, 320, 640)
"""The block widths of the standard ResNet-12 (MetaOptNet)."""


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al., 2018): in training mode, zero ``block_size x block_size`` squares of each channel so
    that a fraction ``drop_rate`` of the units is dropped, and rescale the rest; the identity in eval mode or with
    ``drop_rate=0``. The block is clipped to the feature map (a 2x2 map with ``block_size=5`` drops whole channels).

    Example:
        >>> drop = DropBlock(drop_rate=0.1, block_size=3)
        >>> drop(torch.ones(2, 4, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
        >>> bool(drop.eval()(torch.ones(1, 1, 4, 4)).eq(1).all())
        True
    """

    def __init__(self, drop_rate: float = 0.0, block_size: int = 5):
        super().__init__()
        if not 0 <= drop_rate < 1:
            raise ValueError(f"DropBlock: drop_rate must be in [0, 1) (got {drop_rate})")
        if block_size < 1:
            raise ValueError(f"DropBlock: block_size must be >= 1 (got {block_size})")
        self.drop_rate, self.block_size = float(drop_rate), int(block_size)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_rate == 0:
            return x
        h, w = x.shape[-2], x.shape[-1]
        bs = min(self.block_size, h, w)
        # seed probability so that about drop_rate of the units fall in a dropped block (Ghiasi et al., eq. 1)
        gamma = self.drop_rate / bs ** 2 * (h * w) / ((h - bs + 1) * (w - bs + 1))
        seeds = torch.bernoulli(torch.full((*x.shape[:-2], h - bs + 1, w - bs + 1), gamma, dtype=x.dtype,
                                           device=x.device))
        pad = bs - 1
        blocks = F.max_pool2d(F.pad(seeds, (pad, pad, pad, pad)), kernel_size=bs, stride=1)
        keep = 1 - blocks
        return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}"


class ResNet12Block(nn.Module):
    """Three 3x3 conv + BatchNorm + LeakyReLU(0.1), a 1x1 conv + BatchNorm shortcut, a 2x2 max-pool, then dropout
    (``drop_block=False``) or :class:`DropBlock` when ``drop_rate > 0``.

    Example:
        >>> block = ResNet12Block(3, 8)
        >>> block(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 8, 8])
    """

    def __init__(self, in_channels: int, channels: int, *, drop_rate: float = 0.0, drop_block: bool = False,
                 block_size: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn1 = BatchNorm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = BatchNorm(channels)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = BatchNorm(channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), BatchNorm(channels))
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.drop: nn.Module = (DropBlock(drop_rate, block_size) if drop_block else nn.Dropout(drop_rate)) \
            if drop_rate > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.drop(self.pool(self.act(out + self.shortcut(x))))


class ResNet12(nn.Module):
    """Four :class:`ResNet12Block` (``layer1`` .. ``layer4``), global average pooling and, when ``ways`` is given, a
    linear ``head``. Build it with :func:`resnet12`, which checks the arguments.

    Example:
        >>> net = ResNet12(ways=None, in_channels=3, widths=(2, 3, 4, 5), drop_rate=0.0, block_size=5)
        >>> net(torch.randn(2, 3, 16, 16)).shape, net.feature_dim
        (torch.Size([2, 5]), 5)
    """

    def __init__(self, ways: int | None, in_channels: int, widths: Sequence[int], drop_rate: float, block_size: int):
        super().__init__()
        blocks = []
        channels = in_channels
        for i, width in enumerate(widths):
            blocks.append(ResNet12Block(channels, width, drop_rate=drop_rate, drop_block=i >= 2,
                                        block_size=block_size))
            channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.feature_dim = channels
        self.head: nn.Module | None = nn.Linear(channels, ways) if ways is not None else None

    def embed(self, x: Tensor) -> Tensor:
        """Globally average-pooled features, shape ``(N, widths[-1])``."""
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        features = self.embed(x)
        return self.head(features) if self.head is not None else features


def resnet12(ways: int | None = 5, *, widths: Sequence[int] = RESNET12_WIDTHS, in_channels: int = 3,
             drop_rate: float = 0.0, block_size: int = 5) -> ResNet12:
    """ResNet-12 (MetaOptNet's, widths 64-160-320-640) with metafunc's exact BatchNorm.

    ``ways=None`` gives the encoder (``(examples, 640)`` features, as ProtoNets and the other metric learners take);
    an int adds a linear ``head`` with that many outputs. The standard encoder has 12,424,320 parameters (bias-free
    convolutions and the BatchNorm weights and biases); a 5-way head adds 3,205. ``widths`` (four ints) scales the
    blocks, e.g. ``(2, 3, 4, 5)`` for tests. ``drop_rate > 0`` turns on dropout in blocks 1-2 and DropBlock of
    ``block_size`` in blocks 3-4 (training mode only; refused under ``meta_batch(..., mode="vmap")``, which cannot
    give each task its own random draw). Works on any input of at least 16x16 (84x84 and 32x32 are the benchmarks').

    Example:
        >>> net = resnet12(ways=5, widths=(4, 4, 8, 8))
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 5])
        >>> resnet12(ways=None, widths=(4, 4, 8, 8))(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 8])
    """
    if ways is not None and (isinstance(ways, bool) or not isinstance(ways, int) or ways < 1):
        raise ValueError(f"resnet12: ways must be a positive int, or None for an encoder without head (got {ways!r})")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"resnet12: in_channels must be a positive int (got {in_channels!r})")
    widths = tuple(widths) if isinstance(widths, (list, tuple)) else widths
    if not isinstance(widths, tuple) or len(widths) != 4 or \
            any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"resnet12: widths must be four positive ints, e.g. {RESNET12_WIDTHS} (got {widths!r})")
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
        raise ValueError(f"resnet12: drop_rate must be a number in [0, 1) (got {drop_rate!r}); MetaOptNet uses 0.1")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"resnet12: block_size must be a positive int (got {block_size!r})")
    return ResNet12(ways, in_channels, widths, float(drop_rate), block_size)
