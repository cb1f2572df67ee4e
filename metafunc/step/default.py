"""The fastest meta-step: the meta-gradient of a meta-batch, task by task (or chunk by chunk), in bounded memory.

``meta_batch(per_task)(params, tasks)[0].backward()`` keeps the graph of every task of the meta-batch alive until the
single backward pass, so its peak memory grows with the number of tasks. :func:`meta_value_and_grad` differentiates
each task (``mode="loop"``) or each chunk of tasks (``mode="vmap"``) as soon as it has run and adds the gradients up:
the same meta-gradient (up to the order of a floating-point sum) in the same time, with the peak memory of one task
or one chunk. ``mode="auto"`` measures the candidate ways on the first calls and keeps the fastest (see
:mod:`metafunc.step.plan`).
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Hashable, Literal, cast

import torch
from torch import Tensor

from metafunc._shared import check_steps, under_func_transform
from metafunc.core.batching import check_batching_options, checked_tasks, meta_batch, task_memory_estimate
from metafunc.core.task_function import checks_of, per_task_function
from metafunc.core.types import Metrics, Params, PerTaskFn, Task
from metafunc.step.plan import (
    AUTO_CPU_MEMORY_FRACTION,
    AutoPlanner,
    StepPlan,
    available_memory,
    candidate_plans,
    plan_key,
)

__all__ = ["meta_value_and_grad", "resolve_workers", "AUTO_CPU_WORKERS", "AUTO_CPU_MEMORY_FRACTION"]

AUTO_CPU_WORKERS = 2
"""Under ``workers=None`` on a CPU, at most this many tasks run at once (one per thread, each with its share of
``torch.get_num_threads()``), and never more than ``torch.get_num_threads()``. On the 2-core CPU of
``benchmarks/RESULTS.md`` two tasks at a time on one core each beat one task at a time on both cores for every
Conv-4 width measured (see there). Each task in flight holds its own activations; their starts are spread over a
task's duration (:func:`_in_order`), so that their memory peaks do not coincide: two Conv-4 tasks of 5 inner steps
peaked at 1.26x the memory of one task at a time, against 1.89-1.98x when they started together (at 1 inner step
spacing did not lower the peak, see ``benchmarks/RESULTS.md``)."""

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_WORKER = threading.local()  # ``active`` is set in the pool's threads: a meta-step inside a task runs its tasks inline


def _pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, each running torch's kernels on ``threads`` intra-op threads of its own.

    torch keeps the OpenMP thread count per thread (``torch.set_num_threads`` sets the calling thread's count and a
    process-wide default that new threads copy on their first parallel kernel). Each pool thread sets up its count
    from the default, then sets its own; once every pool thread has done so, the caller's default is put back, so
    nothing outside the pool changes. Without this, two tasks at a time would each fork a team of all the intra-op
    threads: on 2 cores, 4 spinning threads made small models 2x slower than one task at a time."""
    key = (workers, threads)
    with _POOLS_LOCK:
        if key not in _POOLS:
            previous = torch.get_num_threads()

            def own_thread_count() -> None:
                torch.get_num_threads()  # this thread's first call copies the process-wide default
                torch.set_num_threads(threads)
                _WORKER.active = True

            pool = ThreadPoolExecutor(workers, thread_name_prefix="metafunc-task", initializer=own_thread_count)
            started = threading.Barrier(workers)
            list(pool.map(lambda _: started.wait(timeout=60), range(workers)))  # start every thread now
            torch.set_num_threads(previous)
            _POOLS[key] = pool
        return _POOLS[key]


def _autocast_on() -> bool:
    try:
        return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
    except TypeError:  # pragma: no cover - torch < 2.4 has no device argument
        return torch.is_autocast_enabled()


def resolve_workers(per_task: Callable, tasks: Task, *, mode: str, workers: int | None,
                    params: Params | None = None) -> int:
    """How many tasks :func:`meta_value_and_grad` runs at once (each on its own thread) for these tasks.

    One, unless the meta-batch runs as a loop (``mode="loop"``) on a CPU, outside any ``torch.func`` transform and
    autocast region and outside a task that is itself on a worker thread. Then ``workers`` is used as given (at most
    one per task), and ``workers=None`` picks ``min(tasks, AUTO_CPU_WORKERS, torch.get_num_threads())`` when ``per_task``
    says it is safe to call from several threads (a metafunc learner's function over a model from
    :func:`metafunc.functionalize` without dropout or attention, see :func:`metafunc.core.functional.thread_safe`), and 1
    for any other callable; fewer when that many tasks would not fit in ``AUTO_CPU_MEMORY_FRACTION`` of the available
    memory.

    Example:
        >>> from metafunc import Task
        >>> tasks = Task(torch.randn(8, 5, 1), torch.randn(8, 5, 1), torch.randn(8, 5, 1), torch.randn(8, 5, 1))
        >>> resolve_workers(lambda p, t: t.query_x.sum(), tasks, mode="loop", workers=None)
        1
        >>> resolve_workers(lambda p, t: t.query_x.sum(), tasks, mode="loop", workers=4)
        4
    """
    n = tasks.num_tasks
    if mode != "loop" or n <= 1 or tasks.support_x.device.type != "cpu" or _autocast_on():
        return 1
    if under_func_transform() or getattr(_WORKER, "active", False):
        return 1  # inside a transform, or inside a task already on a worker thread (waiting on the pool would hang)
    if workers is not None:
        return min(workers, n)
    _, safe = checks_of(per_task)
    if not safe():
        return 1
    count = max(1, min(n, AUTO_CPU_WORKERS, torch.get_num_threads()))
    available = available_memory(torch.device("cpu"))
    if available is not None:
        need = task_memory_estimate(params or {}, tasks)
        while count > 1 and count * need > AUTO_CPU_MEMORY_FRACTION * available:
            count -= 1
    return count


def meta_value_and_grad(
    per_task: PerTaskFn | Callable[[Params, Task], Tensor] | Any,
    *,
    mode: Literal["auto", "vmap", "loop"] = "auto",
    chunk_size: int | None = None,
    workers: int | None = None,
    channels_last: bool | None = None,
    validate: bool = True,
) -> Callable[[Params, Task], tuple[Tensor, Metrics, Params]]:
    """Build ``step(params, tasks) -> (loss, metrics, grads)``: the mean meta-loss over the tasks and its gradient.

    ``grads`` holds the gradient of the mean of ``per_task`` over the meta-batch with respect to every parameter
    that requires grad (the tensor ``meta_batch(per_task)(params, tasks)[0].backward()`` would put in ``.grad``).
    Each task (``mode="loop"``) or chunk of ``chunk_size`` tasks (``mode="vmap"``) is differentiated as soon as it
    has run, so the peak memory is that of one task or chunk instead of the whole meta-batch. In a loop on a CPU,
    ``workers`` tasks run at once, each on its own thread with ``torch.get_num_threads() // workers`` intra-op
    threads (:func:`resolve_workers`; ``None`` picks 2 for metafunc's learners, 1 for other callables), their starts
    spread over a task's duration so that they are not all at their memory peak (the end of the forward pass) at once.
    ``channels_last=True`` hands each task's images and 4-D (convolution) weights to ``per_task`` in channels-last
    memory format, the layout torch's CPU pooling and BatchNorm kernels are fast on (same values; the gradients
    come back in the parameters' own layout); ``None`` lets ``mode="auto"`` measure both, ``False`` never.

    ``mode="auto"`` (the default) measures instead of guessing (:mod:`metafunc.step.plan`): for each new signature
    (shapes, dtypes, device) the first calls run the candidates (the loop with 1 or 2 workers, for images on a CPU
    each also channels-last, ``vmap`` over all tasks or chunks of them, within a memory bound) in turn,
    ``AUTO_TRIALS`` times each, and later calls keep the fastest (of those within 10% of it, the one with the fewest
    tasks in flight, which peaks lowest; a race within 20% gets two more calls of each contender first). A candidate
    that cannot run (an op without a batching rule, data-dependent control flow, torch's norm layers at second order
    under vmap, a ``view`` the channels-last layout does not allow) is skipped; the loop always runs. ``step.plan``
    is the :class:`~metafunc.step.plan.StepPlan` of the last call, ``step.planner.report()`` the timings; pass
    ``mode`` (and ``chunk_size``/``workers``/``channels_last``) to fix the plan. The gradients are added up in task
    order, so a given plan gives the same bits on every run; plans agree to floating-point rounding. ``loss`` and
    ``metrics`` are detached. (There is no bf16 option: under bf16 autocast the second-order Conv-4 meta-gradient
    was 25-47% off the float32 one, see ``benchmarks/RESULTS.md``.)

    Example:
        >>> from metafunc import apply_grads, functionalize, maml, models, sinusoid_tasks
        >>> model, params = functionalize(models.mlp())
        >>> learner = maml(model, inner_lr=0.01, steps=1, loss="mse")
        >>> optimizer = torch.optim.Adam(params.values(), lr=1e-3)
        >>> tasks = sinusoid_tasks(4, shots=5, generator=torch.Generator().manual_seed(0))
        >>> step = meta_value_and_grad(learner)
        >>> loss, metrics, grads = step(params, tasks)
        >>> apply_grads(params, grads)
        >>> optimizer.step()
        >>> step.plan.mode in ("loop", "vmap")   # the way this call ran; fixed once the candidates are measured
        True
    """
    per_task = per_task_function(per_task, "meta_value_and_grad")
    check_batching_options("meta_value_and_grad", mode, chunk_size)
    if workers is not None:
        check_steps("meta_value_and_grad", "workers", workers)
        if mode == "vmap" and workers > 1:
            raise ValueError(f"meta_value_and_grad: workers={workers} runs tasks on threads, which needs mode='loop' "
                             "or 'auto' (got mode='vmap'); drop workers or use mode='loop'")
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(f"meta_value_and_grad: channels_last must be True, False or None (got {channels_last!r})")
    if channels_last and mode == "vmap":
        raise ValueError("meta_value_and_grad: channels_last=True changes the layout of each task in a loop, which "
                         "needs mode='loop' or 'auto' (got mode='vmap'); drop channels_last or use mode='loop'")

    planner = AutoPlanner()
    spacings: dict[Hashable, _Spacing] = {}  # per signature and plan: how long a task takes on a worker thread

    def step(params: Params, tasks: Task) -> tuple[Tensor, Metrics, Params]:
        if not isinstance(params, dict):
            raise TypeError(f"meta_value_and_grad: params must be a dict of tensors (got {type(params).__name__})")
        tasks = checked_tasks("meta_value_and_grad", per_task, params, tasks, mode="loop" if mode == "auto" else mode,
                              validate=validate)
        names = [k for k, v in params.items() if isinstance(v, Tensor) and v.requires_grad]
        if not names:
            raise ValueError("meta_value_and_grad: no parameter requires grad; pass leaves from functionalize(module) "
                             "(or call .requires_grad_() on the ones to meta-learn)")
        if tasks.num_tasks < 1:
            raise ValueError("meta_value_and_grad: the meta-batch is empty (0 tasks); stack at least one task")

        key = plan_key(params, tasks)

        def run_plan(plan: StepPlan) -> tuple[Tensor, Metrics, Params]:
            return _run_plan(per_task, plan, params, tasks, names, _spacing_of(spacings, (key, plan)))

        if mode == "auto":
            def candidates() -> list[StepPlan]:
                loop_workers = resolve_workers(per_task, tasks, mode="loop", workers=None, params=params)
                return candidate_plans(per_task, params, tasks, chunk_size=chunk_size, workers=workers,
                                       loop_workers=loop_workers, channels_last=channels_last)
            out, plan = planner.run(key, candidates, run_plan)
        else:
            plan = StepPlan(mode, chunk_size if mode == "vmap" else None,
                            resolve_workers(per_task, tasks, mode=mode, workers=workers, params=params),
                            bool(channels_last))
            out = run_plan(plan)
        step.plan = plan  # type: ignore[attr-defined]
        return out

    step.__name__ = f"meta_value_and_grad_{getattr(per_task, '__name__', 'per_task')}"
    step.plan = None  # type: ignore[attr-defined]
    step.planner = planner  # type: ignore[attr-defined]
    return step


def _run_plan(per_task: Callable, plan: StepPlan, params: Params, tasks: Task, names: list[str],
              spacing: _Spacing | None = None) -> tuple[Tensor, Metrics, Params]:
    """One meta-step run the way ``plan`` says: each task (loop, ``plan.workers`` at once) or chunk (vmap)
    differentiated as soon as it has run, the gradients added up in task order."""
    n = tasks.num_tasks
    leaves = [params[k] for k in names]
    if plan.mode == "loop":
        bounds = [(i, i + 1) for i in range(n)]
    else:
        size = plan.chunk_size or n
        bounds = [(i, min(i + size, n)) for i in range(0, n, size)]
    batched = meta_batch(per_task, mode="vmap", reduce="sum", validate=False)
    grad_mode = torch.is_grad_enabled()

    def differentiate(start: int, stop: int) -> tuple[tuple[Tensor | None, ...], Tensor, Metrics]:
        with torch.set_grad_enabled(grad_mode):  # grad mode is per thread
            if plan.mode == "loop":
                inputs = (params, tasks.task_at(start))
                loss, metrics = per_task(*(_channels_last(*inputs) if plan.channels_last else inputs))
            else:
                loss, metrics = batched(params, Task(*(t[start:stop] for t in tasks)))
            found = torch.autograd.grad(loss / n, leaves, allow_unused=True)
        return found, loss.detach(), {k: v.detach() for k, v in metrics.items()}

    total: list[Tensor | None] = [None] * len(leaves)
    loss_sum: Tensor | None = None
    metric_sums: dict[str, Tensor] = {}
    in_flight = plan.workers if plan.mode == "loop" else 1
    for found, loss, metrics in _in_order(differentiate, bounds, in_flight, spacing):
        total = [g if t is None else (t if g is None else t + g) for t, g in zip(total, found)]
        loss_sum = loss if loss_sum is None else loss_sum + loss
        for k, v in metrics.items():
            metric_sums[k] = v if k not in metric_sums else metric_sums[k] + v
    grads = {k: torch.zeros_like(p) if g is None else _layout_of(p, g) for k, p, g in zip(names, leaves, total)}
    return cast(Tensor, loss_sum) / n, {k: v / n for k, v in metric_sums.items()}, grads


def _nhwc(t: Tensor) -> Tensor:
    """``t`` (4-D, floating) with channels-last strides, differentiably; a 1-channel tensor gets them too (where
    ``contiguous(memory_format=...)`` would keep its strides, and torch would pick the slow layout for the layer)."""
    if not (isinstance(t, Tensor) and t.dim() == 4 and t.is_floating_point()):
        return t
    return torch.empty_like(t, memory_format=torch.channels_last).copy_(t)


def _channels_last(params: Params, task: Task) -> tuple[Params, Task]:
    """One task's inputs for a channels-last plan: its images and the 4-D weights in channels-last format."""
    return {k: _nhwc(v) for k, v in params.items()}, Task(*(_nhwc(t) for t in task))


def _layout_of(param: Tensor, grad: Tensor) -> Tensor:
    """``grad`` with ``param``'s strides (a channels-last plan's gradients come back in the other layout)."""
    if grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)


class _Spacing:
    """How long a task of a plan takes on its worker thread (the median of the last few to finish), kept per
    signature: the loop spaces the starts of the tasks in flight by this over ``workers`` (see :func:`_in_order`)."""

    __slots__ = ("_recent", "_lock")

    def __init__(self) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=5)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:  # worker threads add, the caller's thread reads
            self._recent.append(seconds)

    @property
    def seconds(self) -> float | None:
        with self._lock:
            recent = sorted(self._recent)
        return recent[len(recent) // 2] if recent else None


def _spacing_of(spacings: dict[Hashable, _Spacing], key: Hashable, keep: int = 64) -> _Spacing:
    """The timings kept for ``key``, new if there are none; at most ``keep`` keys (the oldest goes), so that tasks
    of ever new shapes do not grow them without bound."""
    if key not in spacings:
        if len(spacings) >= keep:
            spacings.pop(next(iter(spacings)))
        spacings[key] = _Spacing()
    return spacings[key]


def _in_order(fn: Callable[[int, int], Any], bounds: list[tuple[int, int]], workers: int,
              spacing: _Spacing | None = None):
    """Yield ``fn(*b)`` for each ``b`` in order, computing up to ``workers`` of them at once on a thread pool.

    At most ``workers`` tasks are in flight or waiting, and their starts are spread over one task's duration: task
    ``i`` starts no sooner than ``spacing.seconds / workers`` after task ``i - 1`` (the first time, once task 0 has
    finished and so been timed). A task's memory peaks at the end of its forward pass and falls through its backward
    pass, so tasks started together (all at their peak at once) hold ``workers`` peaks, and spaced ones can hold
    less (where a task frees much of its memory early in its backward pass, see ``AUTO_CPU_WORKERS``), at the cost
    of about one task's duration per meta-step (the first start waits, the last task ends alone). Results are
    consumed in order, so sums over them do not depend on which thread finished first."""
    if workers <= 1:
        for b in bounds:
            yield fn(*b)
        return
    spacing = spacing or _Spacing()
    pool = _pool(workers, max(1, torch.get_num_threads() // workers))
    pending: collections.deque[Future] = collections.deque()

    def timed(*b: int) -> Any:
        start = time.perf_counter()
        out = fn(*b)
        spacing.add(time.perf_counter() - start)
        return out

    last_start: float | None = None

    def submit(b: tuple[int, int]) -> None:
        nonlocal last_start
        if last_start is not None:
            seconds = spacing.seconds
            if seconds is None:  # the first call: wait for a task to be timed
                futures.wait([pending[-1]])
                seconds = spacing.seconds or 0.0
            time.sleep(max(0.0, last_start + seconds / workers - time.perf_counter()))
        last_start = time.perf_counter()
        pending.append(pool.submit(timed, *b))

    upcoming = iter(bounds)
    try:
        for b in upcoming:
            submit(b)
            if len(pending) == workers:
                break
        while pending:
            result = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                submit(following)
            yield result
    finally:
        for future in pending:  # an error or an abandoned generator: do not leave tasks running behind us
            future.cancel()
        for future in pending:
            if not future.cancelled():
                future.exception()
