"""``meta_batch``: run a per-task function over a stacked meta-batch of tasks, vectorised or in a loop."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Literal

import torch
from torch import Tensor
from torch.func import vmap

from ._types import Metrics, Params, PerTaskFn, Task
from ._validation import check_choice, check_steps, check_task

__all__ = ["meta_batch", "MODES"]

MODES = ("vmap", "loop")


def _split(out: Any) -> tuple[Tensor, Metrics]:
    if isinstance(out, tuple) and len(out) == 2:
        return out[0], out[1]
    return out, {}


@contextlib.contextmanager
def _no_attention_fast_path() -> Iterator[None]:
    """Turn off the inference fast path of ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` for a while.

    Under ``vmap`` a batched tensor reports ``requires_grad=False`` even when it is being differentiated, so an
    eval-mode transformer would take its fused, non-differentiable fast path (and torch's fused layer norm) inside
    the meta-batch; the regular path computes the same values with differentiable ops.
    """
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "get_fastpath_enabled"):
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


def meta_batch(
    per_task: PerTaskFn | Callable[[Params, Task], Tensor],
    *,
    mode: Literal["vmap", "loop"] = "vmap",
    chunk_size: int | None = None,
    reduce: Literal["mean", "sum", "none"] = "mean",
    validate: bool = True,
) -> Callable[[Params, Task], tuple[Tensor, Metrics]]:
    """Batch ``per_task(params, task) -> loss`` or ``-> (loss, metrics)`` over tasks stacked along dim 0.

    ``mode="vmap"`` vectorises over tasks with :func:`torch.func.vmap` (``chunk_size`` tasks at a time to bound
    memory); ``mode="loop"`` runs a Python loop and gives the same numbers. The result is ``(loss, metrics)``
    reduced over tasks (``reduce="mean"`` by default; ``"none"`` keeps one value per task). Inputs are checked
    eagerly, before any transform runs; a learner's own checks (label range, parameter names, models that would get
    wrong second-order gradients under vmap) run here too.

    Example:
        >>> import torch.nn.functional as F
        >>> from metafunc import functionalize, maml, Task
        >>> model, params = functionalize(torch.nn.Linear(1, 1))
        >>> learner = maml(model, inner_lr=0.01, steps=1, loss="mse")
        >>> tasks = Task(torch.randn(8, 5, 1), torch.randn(8, 5, 1), torch.randn(8, 5, 1), torch.randn(8, 5, 1))
        >>> loss, metrics = meta_batch(learner.meta_loss)(params, tasks)
        >>> loss.backward()  # meta-gradient in params[...].grad
    """
    if not callable(per_task):
        raise TypeError(f"meta_batch: per_task must be callable (got {type(per_task).__name__})")
    check_choice("meta_batch", "mode", mode, MODES)
    check_choice("meta_batch", "reduce", reduce, ("mean", "sum", "none"))
    if chunk_size is not None:
        check_steps("meta_batch", "chunk_size", chunk_size)
    learner_check = getattr(per_task, "validate", None)

    def reduce_fn(x: Tensor) -> Tensor:
        if reduce == "mean":
            return x.mean(0)
        if reduce == "sum":
            return x.sum(0)
        return x

    @functools.wraps(per_task)
    def batched(params: Params, tasks: Task) -> tuple[Tensor, Metrics]:
        if validate:
            tasks = check_task(tasks, caller="meta_batch")
            if learner_check is not None:
                learner_check(params, tasks, vmapped=mode == "vmap")
        else:
            tasks = Task(*tasks)
        if mode == "vmap":
            with _no_attention_fast_path():
                loss, metrics = vmap(lambda t: _split(per_task(params, t)), in_dims=(0,), chunk_size=chunk_size,
                                     randomness="error")(tasks)
        else:
            outs = [_split(per_task(params, tasks.task_at(i))) for i in range(tasks.num_tasks)]
            loss = torch.stack([o[0] for o in outs])
            metrics = {k: torch.stack([o[1][k] for o in outs]) for k in outs[0][1]}
        return reduce_fn(loss), {k: reduce_fn(v) for k, v in metrics.items()}

    return batched
