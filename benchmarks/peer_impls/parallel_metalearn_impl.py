"""parallel-metalearn: ``metalearn.algorithms.MAML`` with its default ``backend="vmap"``, as in its README.

Its MAML vectorises the tasks with ``torch.func.vmap`` (the inner gradient is ``torch.func.grad``) and back-propagates
the mean query loss of each chunk of ``chunk_size`` tasks; here ``chunk_size`` is the meta-batch, the README's full
vectorisation. Its ``ModelTranslator.convert_to_functional`` cannot convert a BatchNorm (0.5.6 passes ``learn_gamma``
to its own ``BatchNorm``, which takes no such argument), so the Conv-4 is rebuilt from its layers: its ``BatchNorm``
(``track_running_stats=False``: batch statistics, like metafunc's) between torch's conv, ReLU and max-pool, in blocks
that pass its ``training``/``num_step`` keywords on, as its own ``CNN2D4L_Backbone`` does (that one is fixed at 64
filters and 64x64 inputs), and a linear head that accepts them; the weights are copied from the given module.

``MAML.step`` ends with ``optimizer.step()``; a no-op outer optimizer leaves the meta-gradient in ``.grad`` for the
check. ``learn_lr=False`` makes its ``InnerSGD`` plain MAML's fixed step size (its default learns it); it still keeps
the rate in a float32 parameter, made with ``torch.full`` at the default dtype, so it is cast to the module's dtype and
refilled (a cast alone keeps ``float32(0.4)``, 1.5e-8 off, and the float64 check fails at 2e-8).

Exact in float64 (1e-14). In float32 its meta-gradient is further from the float64 one than the plain loop's
(2.7e-5 against 1.4e-6 at width 64): its ``BatchNorm`` divides by ``sqrt(var + eps)``, which rounds worse under vmap.
"""

from __future__ import annotations

import importlib.metadata
from typing import Callable

import torch
from torch import Tensor, nn

try:
    from metalearn.algorithms import MAML
    from metalearn.inner_optimizers import InnerSGD
    from metalearn.loss import CategoricalAccuracy, CrossEntropy
    from metalearn.model_wrappers import MAML_Model
    from metalearn.nn_models.basic_layers import BatchNorm

    VERSION = importlib.metadata.version("parallel-metalearn")
    AVAILABLE, WHY = True, ""
except (ImportError, importlib.metadata.PackageNotFoundError) as error:  # pragma: no cover - optional peer
    AVAILABLE, WHY = False, f"not installed ({error})"


class _Block(nn.Module):
    """conv -> its BatchNorm (batch statistics) -> ReLU -> max-pool, passing its keywords to the norm."""

    def __init__(self, conv: nn.Conv2d, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
        self.bn = BatchNorm(conv.out_channels, eps=eps, track_running_stats=False)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.pool(torch.relu(self.bn(self.conv(x), **kwargs)))


class _Backbone(nn.Module):
    def __init__(self, blocks: list[_Block]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        for block in self.blocks:
            x = block(x, **kwargs)
        return x


class _Head(nn.Linear):
    """``MAML_Model`` calls its head with the forward keywords; ``nn.Linear`` takes none."""

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return super().forward(x)


class _GradientOnly(torch.optim.Optimizer):
    """An outer optimiser whose ``step`` does nothing, so the meta-gradient stays in ``.grad``."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def _translate(module: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """metafunc's Conv-4 rebuilt from the library's layers, its weights copied; and its names -> the module's."""
    blocks, names = [], {}
    for i, (conv, norm, *_) in enumerate(module.features):
        blocks.append(_Block(conv, norm.eps))
        for kind, source in (("conv", f"features.{i}.0"), ("bn", f"features.{i}.1")):
            for p in ("weight", "bias"):
                names[f"backbone.blocks.{i}.{kind}.{p}"] = f"{source}.{p}"
    head = _Head(module.head.in_features, module.head.out_features)
    names.update({"head.weight": "head.weight", "head.bias": "head.bias"})
    model = MAML_Model(backbone=_Backbone(blocks), head=head)
    reference = next(module.parameters())
    model.to(device=reference.device, dtype=reference.dtype)
    source = dict(module.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(source[names[name]])
    return model, names


def maml_step(module: nn.Module, tasks, *, inner_lr: float, steps: int, first_order: bool) -> Callable[[], dict]:
    model, names = _translate(module)
    dtype, device = next(module.parameters()).dtype, tasks.support_x.device
    inner = InnerSGD(model.get_fast_weights(), first_order=first_order, inner_lr=inner_lr, max_inner_steps=steps,
                     learn_lr=False).to(dtype)
    with torch.no_grad():  # it made the rate in float32: 0.4 became 0.4000000059604645
        for rate in inner.parameters():
            rate.fill_(inner_lr)
    maml = MAML(model=model, optimizer=_GradientOnly(model.parameters()), inner_optimizer=inner,
                support_loss_fn=CrossEntropy(metric_fn=CategoricalAccuracy()), inner_steps=steps,
                chunk_size=tasks.num_tasks, device=device, backend="vmap")
    batch = (tasks.support_x, {"labels": tasks.support_y}, tasks.query_x, {"labels": tasks.query_y})

    def step() -> dict[str, Tensor]:
        maml.step(iter([batch]), training=True)
        return {names[k]: torch.zeros_like(p) if p.grad is None else p.grad for k, p in model.named_parameters()}

    return step


protonet_step = None  # its PrototypicalNetwork is not part of this MAML comparison (see README Performance)
