"""The fastest meta-step: the meta-gradient of a meta-batch, task by task (or chunk by chunk), in bounded memory.

``meta_batch(per_task)(params, tasks)[0].backward()`` keeps the graph of every task of the meta-batch alive until the
single backward pass, so its peak memory grows with the number of tasks. :func:`meta_value_and_grad` differentiates
each task (``mode="loop"``) or each chunk of tasks (``mode="vmap"``) as soon as it has run and adds the gradients up:
the same meta-gradient (up to the order of a floating-point sum) in the same time, with the peak memory of one task
or one chunk. ``mode="auto"`` picks the loop on a CPU and chunked ``vmap`` on a GPU (see
:func:`metafunc.batching.resolve_mode`).
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import torch
from torch import Tensor

from ._types import Metrics, Params, PerTaskFn, Task
from .batching import check_batching_options, checked_tasks, meta_batch, resolve_mode

__all__ = ["meta_value_and_grad"]


def meta_value_and_grad(
    per_task: PerTaskFn | Callable[[Params, Task], Tensor],
    *,
    mode: Literal["auto", "vmap", "loop"] = "auto",
    chunk_size: int | None = None,
    validate: bool = True,
) -> Callable[[Params, Task], tuple[Tensor, Metrics, Params]]:
    """Build ``step(params, tasks) -> (loss, metrics, grads)``: the mean meta-loss over the tasks and its gradient.

    ``grads`` holds the gradient of the mean of ``per_task`` over the meta-batch with respect to every parameter
    that requires grad (the tensor ``meta_batch(per_task)(params, tasks)[0].backward()`` would put in ``.grad``).
    Each task (``mode="loop"``) or chunk of ``chunk_size`` tasks (``mode="vmap"``) is differentiated as soon as it
    has run, so the peak memory is that of one task or chunk instead of the whole meta-batch. ``mode="auto"`` (the
    default) picks with :func:`metafunc.batching.resolve_mode`: a loop of plain ``torch.autograd`` steps on a CPU,
    chunked ``vmap`` on a GPU. ``loss`` and ``metrics`` are detached. (There is no bf16 option: under bf16 autocast
    the second-order Conv-4 meta-gradient was 25-47% off the float32 one, see ``benchmarks/RESULTS.md``.)

    Example:
        >>> from metafunc import functionalize, maml, models, sinusoid_tasks
        >>> model, params = functionalize(models.mlp())
        >>> learner = maml(model, inner_lr=0.01, steps=1, loss="mse")
        >>> tasks = sinusoid_tasks(4, shots=5, generator=torch.Generator().manual_seed(0))
        >>> loss, metrics, grads = meta_value_and_grad(learner.meta_loss)(params, tasks)
        >>> for name, p in params.items():
        ...     p.grad = grads[name]  # then optimizer.step()
    """
    if not callable(per_task):
        raise TypeError(f"meta_value_and_grad: per_task must be callable (got {type(per_task).__name__})")
    check_batching_options("meta_value_and_grad", mode, chunk_size)

    @functools.wraps(per_task)
    def step(params: Params, tasks: Task) -> tuple[Tensor, Metrics, Params]:
        if not isinstance(params, dict):
            raise TypeError(f"meta_value_and_grad: params must be a dict of tensors (got {type(params).__name__})")
        tasks = checked_tasks("meta_value_and_grad", per_task, params, tasks, mode=mode, validate=validate)
        names = [k for k, v in params.items() if isinstance(v, Tensor) and v.requires_grad]
        if not names:
            raise ValueError("meta_value_and_grad: no parameter requires grad; pass leaves from functionalize(module) "
                             "(or call .requires_grad_() on the ones to meta-learn)")
        leaves = [params[k] for k in names]
        run_mode, run_chunk = resolve_mode(params, tasks, mode=mode, chunk_size=chunk_size)
        n = tasks.num_tasks
        if n < 1:
            raise ValueError("meta_value_and_grad: the meta-batch is empty (0 tasks); stack at least one task")
        if run_mode == "loop":
            bounds = [(i, i + 1) for i in range(n)]
        else:
            size = run_chunk or n
            bounds = [(i, min(i + size, n)) for i in range(0, n, size)]
        batched = meta_batch(per_task, mode="vmap", reduce="sum", validate=False)
        total: list[Tensor | None] = [None] * len(leaves)
        loss_sum: Tensor | None = None
        metric_sums: dict[str, Tensor] = {}
        for start, stop in bounds:
            if run_mode == "loop":
                out = per_task(params, tasks.task_at(start))
                loss, metrics = (out[0], out[1]) if isinstance(out, tuple) and len(out) == 2 else (out, {})
            else:
                loss, metrics = batched(params, Task(*(t[start:stop] for t in tasks)))
            found = torch.autograd.grad(loss / n, leaves, allow_unused=True)
            total = [g if t is None else (t if g is None else t + g) for t, g in zip(total, found)]
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            for k, v in metrics.items():
                metric_sums[k] = v.detach() if k not in metric_sums else metric_sums[k] + v.detach()
        grads = {k: torch.zeros_like(p) if g is None else g for k, p, g in zip(names, leaves, total)}
        return loss_sum / n, {k: v / n for k, v in metric_sums.items()}, grads  # type: ignore[operator]

    return step
