"""The meta-step: one contract for every way of computing a meta-gradient.

A meta-step is ``step(params, tasks) -> (loss, metrics, grads)``: the mean meta-loss over a stacked meta-batch, the
mean of each metric (all detached) and the meta-gradient ``grads``, a dict with a tensor for every parameter that
requires grad. Apply it with ``p.grad = grads[name]`` and any ``torch.optim`` optimizer.

* :func:`meta_value_and_grad` is the default step: a task (or a chunk of tasks) is differentiated as soon as it has
  run, so the peak memory is that of one task or chunk; on a CPU two tasks run at once on threads.
* :func:`compiled_meta_step`: the whole meta-step traced once and compiled (CUDA graphs on a GPU).
* :func:`metafunc.distributed.sharded` wraps any step: this rank's share of the meta-batch, then a weighted
  all-reduce, so every rank gets the whole meta-batch's step.

``metafunc train``, ``metafunc bench`` and the text experiment all take their meta-steps through
:func:`meta_value_and_grad`.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from metafunc.core.types import Metrics, Params, Task
from metafunc.step.compiled import compiled_meta_step
from metafunc.step.default import AUTO_CPU_MEMORY_FRACTION, AUTO_CPU_WORKERS, meta_value_and_grad, resolve_workers

__all__ = ["MetaStep", "meta_value_and_grad", "compiled_meta_step", "resolve_workers", "AUTO_CPU_WORKERS",
           "AUTO_CPU_MEMORY_FRACTION", "apply_grads"]


class MetaStep(Protocol):
    """``step(params, tasks) -> (loss, metrics, grads)``: what every meta-step of metafunc returns.

    Example:
        >>> import torch
        >>> from metafunc import functionalize, maml, meta_value_and_grad, sinusoid_tasks
        >>> model, params = functionalize(torch.nn.Linear(1, 1))
        >>> step: MetaStep = meta_value_and_grad(maml(model, inner_lr=0.01, loss="mse"))
        >>> loss, metrics, grads = step(params, sinusoid_tasks(3, shots=5, generator=torch.Generator().manual_seed(0)))
        >>> sorted(grads) == sorted(params)
        True
    """

    def __call__(self, params: Params, tasks: Task, /) -> tuple[Tensor, Metrics, Params]: ...


def apply_grads(params: Params, grads: Params) -> None:
    """Set ``.grad`` of each parameter to the meta-step's gradient (replacing what was there), ready for
    ``optimizer.step()``.

    Example:
        >>> import torch
        >>> params = {"w": torch.zeros(2, requires_grad=True)}
        >>> apply_grads(params, {"w": torch.ones(2)})
        >>> params["w"].grad
        tensor([1., 1.])
    """
    for name, g in grads.items():
        params[name].grad = g

