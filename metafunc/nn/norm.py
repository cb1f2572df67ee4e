"""Normalisation layers whose gradients are exact under every ``torch.func`` transform.

torch 2.13's fused ``batch_norm``/``layer_norm`` kernels give wrong second-order gradients under ``vmap`` (a Conv-4
with BatchNorm is off by percents against a float64 ``torch.autograd`` loop). The layers here compute the same
function from elementary ops (mean, subtraction, ``rsqrt``), whose batching and double-backward rules are exact.
:func:`convert_norm_layers` swaps torch's layers for them in any model, carrying the weights over, and
:func:`find_torch_norm_layers` lists the layers that would give wrong meta-gradients.
"""

from __future__ import annotations

import copy
from typing import Literal, Sequence, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metafunc._shared import under_func_transform

__all__ = ["BatchNorm", "LayerNorm", "GroupNorm", "convert_norm_layers", "find_torch_norm_layers", "TORCH_NORM_TYPES"]

TORCH_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)
"""torch's norm layers, which use the fused kernels that are wrong at second order under ``vmap``."""


def _normalize(x: Tensor, dims: Sequence[int], eps: float) -> Tensor:
    mean = x.mean(dim=tuple(dims), keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=tuple(dims), keepdim=True)
    return centred * torch.rsqrt(var + eps)


class BatchNorm(nn.Module):
    """Batch normalisation over ``(N, C, *)`` inputs with the statistics of the batch it is given.

    This is the MAML reference protocol: each task is normalised with its own batch statistics at training and at
    test time (transductive). With ``use_running_stats=True`` the layer instead applies fixed statistics held as
    buffers (a converted pretrained model in eval mode); they are never updated.

    Example:
        >>> bn = BatchNorm(8)
        >>> bn(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, use_running_stats: bool = False):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"BatchNorm: num_features must be >= 1 (got {num_features})")
        if eps <= 0:
            raise ValueError(f"BatchNorm: eps must be > 0 (got {eps})")
        self.num_features, self.eps, self.affine, self.use_running_stats = num_features, eps, affine, use_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if use_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm: expected input (N, {self.num_features}, ...) (got shape {tuple(x.shape)})")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.use_running_stats:
            mean, var = cast(Tensor, self.running_mean), cast(Tensor, self.running_var)
            y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        elif not under_func_transform() and x.numel() > x.shape[1]:
            # No torch.func transform is running (a plain autograd loop, meta_batch(mode="loop")): torch's fused
            # kernel computes the same function, and its gradients are exact outside vmap, in less time and memory.
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        else:
            y = _normalize(x, [0] + list(range(2, x.dim())), self.eps)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, use_running_stats={self.use_running_stats}"


class LayerNorm(nn.Module):
    """Layer normalisation over the trailing ``normalized_shape`` dimensions, exact under ``vmap``.

    Example:
        >>> LayerNorm(16)(torch.randn(3, 16)).shape
        torch.Size([3, 16])
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"LayerNorm: normalized_shape must be positive sizes (got {normalized_shape})")
        if eps <= 0:
            raise ValueError(f"LayerNorm: eps must be > 0 (got {eps})")
        self.normalized_shape, self.eps, self.elementwise_affine = shape, eps, elementwise_affine
        self.weight = nn.Parameter(torch.ones(shape)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(shape)) if elementwise_affine and bias else None

    def forward(self, x: Tensor) -> Tensor:
        n = len(self.normalized_shape)
        if tuple(x.shape[-n:]) != self.normalized_shape:
            raise ValueError(f"LayerNorm: expected input ending in {self.normalized_shape} (got shape {tuple(x.shape)})")
        y = _normalize(x, list(range(x.dim() - n, x.dim())), self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class GroupNorm(nn.Module):
    """Group normalisation of ``(N, C, *)`` inputs over ``num_groups`` channel groups, exact under ``vmap``.

    Example:
        >>> GroupNorm(2, 8)(torch.randn(3, 8, 4, 4)).shape
        torch.Size([3, 8, 4, 4])
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"GroupNorm: num_channels must be divisible by num_groups (got {num_channels} and {num_groups})"
            )
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm: expected input (N, {self.num_channels}, ...) (got shape {tuple(x.shape)})")
        n, c = x.shape[0], x.shape[1]
        grouped = x.reshape(n, self.num_groups, c // self.num_groups, *x.shape[2:])
        y = _normalize(grouped, list(range(2, grouped.dim())), self.eps).reshape(x.shape)
        if self.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)  # type: ignore[union-attr]
        return y

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


def find_torch_norm_layers(module: nn.Module) -> list[str]:
    """Names of the torch norm layers in ``module`` whose second-order gradients are wrong under ``vmap``.

    Example:
        >>> find_torch_norm_layers(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
        ['1 (LayerNorm)']
    """
    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in module.named_modules()
            if isinstance(m, TORCH_NORM_TYPES)]


def _convert_one(m: nn.Module, batch_norm: str) -> nn.Module | None:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        use_running = batch_norm == "running_stats"
        if use_running and not m.track_running_stats:
            raise ValueError(
                "convert_norm_layers: batch_norm='running_stats' needs layers that track running statistics; "
                "this one has track_running_stats=False (use batch_norm='batch_stats')"
            )
        new: nn.Module = BatchNorm(m.num_features, m.eps, m.affine, use_running_stats=use_running)
    elif isinstance(m, nn.modules.instancenorm._InstanceNorm):
        if m.track_running_stats:
            raise ValueError("convert_norm_layers: InstanceNorm with track_running_stats=True is not supported")
        new = GroupNorm(m.num_features, m.num_features, m.eps, m.affine)
    elif isinstance(m, nn.LayerNorm):
        new = LayerNorm(m.normalized_shape, m.eps, m.elementwise_affine, bias=m.bias is not None)
    elif isinstance(m, nn.GroupNorm):
        new = GroupNorm(m.num_groups, m.num_channels, m.eps, m.affine)
    else:
        return None
    # Match device and dtype first, then copy: copying into the default-dtype layer would round float64 weights.
    ref = next((t for t in (getattr(m, "weight", None), getattr(m, "running_mean", None)) if t is not None), None)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if getattr(m, "weight", None) is not None:
            cast(Tensor, new.weight).copy_(cast(Tensor, m.weight))
        if getattr(m, "bias", None) is not None:
            cast(Tensor, new.bias).copy_(cast(Tensor, m.bias))
        if isinstance(new, BatchNorm) and new.use_running_stats:
            cast(Tensor, new.running_mean).copy_(cast(Tensor, m.running_mean))
            cast(Tensor, new.running_var).copy_(cast(Tensor, m.running_var))
    return new


def convert_norm_layers(
    module: nn.Module,
    *,
    batch_norm: Literal["batch_stats", "running_stats"] = "batch_stats",
    inplace: bool = False,
) -> nn.Module:
    """Replace torch's BatchNorm/LayerNorm/GroupNorm/InstanceNorm layers by metafunc's exact ones.

    Weights and biases are carried over and parameter names are unchanged, so a ``state_dict`` still loads.
    ``batch_norm="batch_stats"`` (default) normalises with each task's batch statistics, the MAML protocol;
    ``"running_stats"`` keeps a pretrained model's running statistics as fixed buffers (eval-mode behaviour).
    The input module is left untouched unless ``inplace=True``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> exact = convert_norm_layers(net)
        >>> type(exact[1]).__name__, find_torch_norm_layers(exact)
        ('BatchNorm', [])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_norm_layers: module must be an nn.Module (got {type(module).__name__})")
    if batch_norm not in ("batch_stats", "running_stats"):
        raise ValueError(f"convert_norm_layers: batch_norm must be 'batch_stats' or 'running_stats' (got {batch_norm!r})")
    root = module if inplace else copy.deepcopy(module)
    replaced = _convert_one(root, batch_norm)
    if replaced is not None:
        return replaced
    for parent in list(root.modules()):
        for child_name, child in list(parent.named_children()):
            new = _convert_one(child, batch_norm)
            if new is not None:
                setattr(parent, child_name, new)
    return root
