"""``meta_batch``: run a per-task function over a stacked meta-batch of tasks, vectorised or in a loop."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Literal

import torch
from torch import Tensor
from torch.func import vmap

from metafunc._shared import check_choice, check_steps, under_func_transform
from metafunc.core.task_function import checks_of, per_task_function
from metafunc.core.types import Metrics, Params, PerTaskFn, Task, check_task

__all__ = ["meta_batch", "resolve_mode", "task_memory_estimate", "MODES", "Mode", "checked_tasks", "check_batching_options",
           "check_finite_tasks", "vmap_runs"]

Mode = Literal["auto", "vmap", "loop"]
"""How a meta-batch runs: ``"vmap"``, ``"loop"``, or ``"auto"`` (one of them per device and model size)."""

MODES = ("vmap", "loop")
"""The two ways to run a meta-batch; ``mode="auto"`` (the default) picks one of them per device and model size."""

AUTO_VMAP_MEMORY_FRACTION = 0.5
"""Under ``mode="auto"`` on a GPU, a vmapped chunk may use about this fraction of the free device memory."""

_ACTIVATIONS_PER_INPUT = 512
"""A rough upper bound on the bytes of saved activations per input byte of a second-order Conv-4 meta-step."""


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


def resolve_mode(params: Params, tasks: Task, *, mode: str = "auto",
                 chunk_size: int | None = None) -> tuple[str, int | None]:
    """The ``(mode, chunk_size)`` that ``meta_batch(..., mode=mode, chunk_size=chunk_size)`` runs for these tasks.

    A forced mode is returned as given. ``"auto"`` picks:

    * ``"loop"`` when the tasks are on a CPU: a loop of plain ``torch.autograd`` inner steps is the fastest there
      (``vmap`` over tasks measured 2-3.5x slower on a 2-core CPU, with up to 10x the memory; see
      ``benchmarks/RESULTS.md``), and when the tasks are inside another ``torch.func`` transform or there is a
      single task;
    * ``"vmap"`` on a GPU, where a meta-batch of small tasks is launch-bound; with ``chunk_size`` (yours, or one
      chosen so a chunk's estimated activations fit in ``AUTO_VMAP_MEMORY_FRACTION`` of the free memory).

    This is :func:`meta_batch`'s rule (evaluation, objectives under ``torch.func``); the training step
    :func:`metafunc.meta_value_and_grad` chooses by measuring (:mod:`metafunc.step.plan`).

    Example:
        >>> from metafunc import Task
        >>> tasks = Task(torch.randn(8, 5, 1), torch.randn(8, 5, 1), torch.randn(8, 5, 1), torch.randn(8, 5, 1))
        >>> resolve_mode({}, tasks)
        ('loop', None)
        >>> resolve_mode({}, tasks, mode="vmap", chunk_size=2)
        ('vmap', 2)
    """
    if mode != "auto":
        return mode, chunk_size
    device = tasks.support_x.device
    if device.type == "cpu" or tasks.num_tasks <= 1 or under_func_transform():
        return "loop", None
    if chunk_size is not None:
        return "vmap", chunk_size
    try:
        free, _ = torch.cuda.mem_get_info(device) if device.type == "cuda" else (None, None)
    except RuntimeError:  # pragma: no cover - a device without memory queries
        free = None
    if free is None:
        return "vmap", None
    fits = max(1, int(free * AUTO_VMAP_MEMORY_FRACTION // task_memory_estimate(params, tasks)))
    return "vmap", None if fits >= tasks.num_tasks else fits


def vmap_runs(per_task: Callable, params: Params, tasks: Task) -> bool:
    """Whether the learner accepts running these tasks under ``vmap`` (its eager checks with ``vmapped=True``:
    torch's norm layers at second order are refused there); any callable without checks may be tried.

    Example:
        >>> from metafunc import Task
        >>> vmap_runs(lambda p, t: t.query_x.sum(), {}, Task(*[torch.zeros(2, 3, 1)] * 4))
        True
    """
    check, _ = checks_of(per_task_function(per_task, "vmap_runs"))
    if check is None:
        return True
    try:
        check(params, tasks, vmapped=True)
    except (ValueError, TypeError):
        return False
    return True


def task_memory_estimate(params: Params, tasks: Task) -> int:
    """A rough upper bound, in bytes, on the memory one task of ``tasks`` needs in a second-order meta-step.

    ``_ACTIVATIONS_PER_INPUT`` bytes of saved activations per byte of the task's inputs, plus four copies of the
    parameters (the adapted weights, their gradients and the graph between them). It errs on the large side: 125 MB
    for a 5-way 1-shot Omniglot task on Conv-4, whose meta-step measured 65 MB.

    Example:
        >>> from metafunc import Task
        >>> tasks = Task(torch.randn(8, 5, 4), torch.randn(8, 5, 1), torch.randn(8, 5, 4), torch.randn(8, 5, 1))
        >>> task_memory_estimate({"w": torch.zeros(4, 1)}, tasks)
        102464
    """
    per_task = sum(t[0].numel() * t.element_size() for t in tasks) * _ACTIVATIONS_PER_INPUT
    per_task += sum(p.numel() * p.element_size() for p in params.values() if isinstance(p, Tensor)) * 4
    return max(per_task, 1)


def check_batching_options(caller: str, mode: str, chunk_size: int | None) -> None:
    """Eager checks of ``mode`` and ``chunk_size``, shared by :func:`meta_batch` and the meta-steps.

    Example:
        >>> check_batching_options("meta_batch", "loop", None)
        >>> check_batching_options("meta_batch", "fast", None)
        Traceback (most recent call last):
        ...
        ValueError: meta_batch: mode must be one of 'vmap', 'loop' (got 'fast'); or 'auto' (the default) to pick one per device and model size
    """
    if mode != "auto":
        try:
            check_choice(caller, "mode", mode, MODES)
        except ValueError as error:
            raise ValueError(f"{error}; or 'auto' (the default) to pick one per device and model size") from None
    if chunk_size is not None:
        check_steps(caller, "chunk_size", chunk_size)


def check_finite_tasks(caller: str, tasks: Task) -> None:
    """Refuse NaN or inf in a meta-batch's floating-point tensors (inputs, and regression targets), naming the first
    task and tensor that hold one; one reduction per tensor.

    Example:
        >>> from metafunc import Task
        >>> x = torch.zeros(3, 2, 1)
        >>> x[1, 0, 0] = float("nan")
        >>> check_finite_tasks("meta_batch", Task(x, x, x, x))
        Traceback (most recent call last):
        ...
        ValueError: meta_batch: task 1 has NaN or inf in support_x; clean or drop that task (or pass validate=False to skip this check)
    """
    for name, t in zip(Task._fields, tasks):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            per_task = torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
            index = int((~per_task).nonzero()[0, 0])
            raise ValueError(f"{caller}: task {index} has NaN or inf in {name}; clean or drop that task (or pass "
                             "validate=False to skip this check)")


def checked_tasks(caller: str, per_task: Callable, params: Params, tasks: Task, *, mode: str, validate: bool) -> Task:
    """The eager checks before any transform: task shapes, then the learner's own checks (labels, parameter names,
    models refused under vmap at second order) carried by a :class:`metafunc.TaskFunction`; a plain callable gets
    the shape checks only. With ``validate=False`` only the container is rebuilt.

    Example:
        >>> from metafunc import Task
        >>> tasks = checked_tasks("meta_batch", lambda p, t: 0, {}, Task(*[torch.ones(2, 3, 1)] * 4), mode="loop",
        ...                       validate=True)
        >>> tasks.num_tasks
        2
    """
    if not validate:
        return Task(*tasks)
    tasks = check_task(tasks, caller=caller)
    check_finite_tasks(caller, tasks)
    learner_check, _ = checks_of(per_task)
    if learner_check is not None:
        learner_check(params, tasks, vmapped=mode != "loop")
    return tasks


def meta_batch(
    per_task: PerTaskFn | Callable[[Params, Task], Tensor] | Any,
    *,
    mode: Literal["auto", "vmap", "loop"] = "auto",
    chunk_size: int | None = None,
    reduce: Literal["mean", "sum", "none"] = "mean",
    validate: bool = True,
) -> Callable[[Params, Task], tuple[Tensor, Metrics]]:
    """Batch ``per_task(params, task) -> loss`` or ``-> (loss, metrics)`` over tasks stacked along dim 0.

    ``per_task`` is a :class:`metafunc.MetaLearner` (its ``meta_loss`` is batched), a learner's ``meta_loss`` or
    ``evaluate`` (a :class:`metafunc.TaskFunction`, which carries the learner's eager checks), or any callable (which
    gets the generic checks of the task container only).

    ``meta_batch`` is the batched objective, a pure function of ``params`` that composes with ``torch.func``
    transforms. To take a training step, use :func:`metafunc.meta_value_and_grad` (``loss, metrics, grads =
    meta_value_and_grad(learner)(params, tasks)``): the same gradient, with the peak memory of one task.

    ``mode="vmap"`` vectorises over tasks with :func:`torch.func.vmap` (``chunk_size`` tasks at a time to bound
    memory); ``mode="loop"`` runs a Python loop and gives the same numbers; ``mode="auto"`` (the default) picks
    one of them per call with :func:`resolve_mode` (the loop on a CPU; ``vmap``, chunked to fit the free memory,
    on a GPU, unless the learner refuses the model under ``vmap``, as it does torch's fused norm layers at second
    order: then the loop). The training step :func:`metafunc.meta_value_and_grad` measures instead of guessing.
    The result is ``(loss, metrics)``
    reduced over tasks (``reduce="mean"`` by default; ``"none"`` keeps one value per task). Inputs are checked
    eagerly, before any transform runs; a learner's own checks (label range, parameter names, models that would get
    wrong second-order gradients under vmap) run here too.

    Example:
        >>> from metafunc import functionalize, maml, Task
        >>> model, params = functionalize(torch.nn.Linear(1, 1))
        >>> learner = maml(model, inner_lr=0.01, steps=1, loss="mse")
        >>> tasks = Task(torch.randn(8, 5, 1), torch.randn(8, 5, 1), torch.randn(8, 5, 1), torch.randn(8, 5, 1))
        >>> loss, metrics = meta_batch(learner)(params, tasks)  # the mean over the 8 tasks
        >>> sorted(metrics)
        ['loss', 'support_loss']
        >>> grads = torch.func.grad(lambda p: meta_batch(learner)(p, tasks)[0])(params)  # composes with torch.func
        >>> sorted(grads)
        ['bias', 'weight']
    """
    per_task = per_task_function(per_task, "meta_batch")
    check_batching_options("meta_batch", mode, chunk_size)
    check_choice("meta_batch", "reduce", reduce, ("mean", "sum", "none"))

    def reduce_fn(x: Tensor) -> Tensor:
        if reduce == "mean":
            return x.mean(0)
        if reduce == "sum":
            return x.sum(0)
        return x

    @functools.wraps(per_task)
    def batched(params: Params, tasks: Task) -> tuple[Tensor, Metrics]:
        tasks = checked_tasks("meta_batch", per_task, params, tasks, mode="loop" if mode == "auto" else mode,
                              validate=validate)
        run_mode, run_chunk = resolve_mode(params, tasks, mode=mode, chunk_size=chunk_size)
        if mode == "auto" and run_mode == "vmap" and not vmap_runs(per_task, params, tasks):
            run_mode, run_chunk = "loop", None   # e.g. torch's norm layers at second order: exact in a loop only
        if run_mode == "vmap":
            try:
                with _no_attention_fast_path():
                    loss, metrics = vmap(lambda t: per_task(params, t), in_dims=(0,), chunk_size=run_chunk,
                                         randomness="error")(tasks)
            except RuntimeError as error:
                if "randomness" not in str(error):
                    raise
                raise ValueError(
                    "meta_batch: the per-task function draws random numbers under vmap (dropout in training mode?), "
                    "which would tie or mix the randomness of the tasks; call module.eval() before functionalize, "
                    "set the dropout probability to 0, or use meta_batch(..., mode='loop')"
                ) from error
        else:
            outs = [per_task(params, tasks.task_at(i)) for i in range(tasks.num_tasks)]
            loss = torch.stack([o[0] for o in outs])
            metrics = {k: torch.stack([o[1][k] for o in outs]) for k in outs[0][1]}
        return reduce_fn(loss), {k: reduce_fn(v) for k, v in metrics.items()}

    return batched
