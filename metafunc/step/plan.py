"""How ``mode="auto"`` runs a meta-batch: it measures the candidate ways on the first calls and keeps the fastest.

A :class:`StepPlan` is one way :func:`metafunc.meta_value_and_grad` can run a meta-batch: a loop of tasks (``workers``
of them at once on threads, on a CPU) or ``vmap`` over tasks (``chunk_size`` at a time). Which is fastest depends on
the model, the shapes and the machine: on a 2-core CPU a loop wins for a Conv-4 and ``vmap`` wins 10x for the
README's 40-40 MLP. So ``mode="auto"`` does not guess: for each new signature (parameter and task shapes, dtypes,
device, grad mode, thread count) an :class:`AutoPlanner` runs the candidates of :func:`candidate_plans` in turn on
the real meta-batches (each call is a real step, so nothing is wasted), ``AUTO_TRIALS`` times each, then keeps the
fastest for that signature (of candidates within ``AUTO_TIE`` of it, the one with the fewest tasks in flight; a close
race gets ``AUTO_CONFIRM`` more calls of each contender first). A candidate that cannot run (no batching rule for an
op, data-dependent control flow, a model refused under ``vmap``, out of memory, a ``view`` the channels-last layout
does not allow) is skipped, with the reason kept; the loop always remains.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Hashable, NamedTuple, TypeVar

import torch
from torch import Tensor

from metafunc._shared import under_func_transform
from metafunc.core.batching import AUTO_VMAP_MEMORY_FRACTION, task_memory_estimate, vmap_runs
from metafunc.core.types import Params, Task

__all__ = ["StepPlan", "AutoPlanner", "candidate_plans", "channels_last_applies", "plan_key", "available_memory",
           "AUTO_TRIALS", "AUTO_TIE", "AUTO_CONFIRM", "AUTO_CPU_MEMORY_FRACTION"]

AUTO_TRIALS = 2
"""Timed calls of each candidate before ``mode="auto"`` chooses; a candidate's best call counts (its first pays
one-time costs: a thread pool, allocator growth)."""

AUTO_CPU_MEMORY_FRACTION = 0.25
"""On a CPU, the tasks in flight (threads, or a ``vmap`` chunk) may use about this fraction of the available memory
(``MemAvailable``), by :func:`metafunc.core.batching.task_memory_estimate`."""

AUTO_TIE = 0.10
"""Candidates within this fraction of the fastest one's time are a tie, and a tie goes to the plan with the fewest
tasks in flight: each holds its own activations, so it peaks lowest (one task at a time rather than two, a smaller
``vmap`` chunk). Two trials do not resolve less: on the 2-core CPU of ``benchmarks/RESULTS.md`` the Conv-4 loop with
one and with two tasks at once came out 0.4% apart in auto's trials and 16% apart, the other way, in the medians of
the rounds that followed; two tasks at once were at most 7% faster there, at twice the peak memory (started
together, before the loop spread their starts)."""

AUTO_CONFIRM = 2
"""More timed calls for each candidate within twice ``AUTO_TIE`` of the fastest after ``AUTO_TRIALS`` each, when
there are several: the best of four calls decides a close race, not the best of two (on the 2-core CPU two trials
each kept two Conv-4 tasks at once in two of three runs where one task at a time tied them, at twice the memory:
at 1 inner step two tasks peak at about twice one task's memory even with their starts spread)."""

R = TypeVar("R")


class StepPlan(NamedTuple):
    """One way to run a meta-batch: ``mode`` ``"loop"`` (``workers`` tasks at once) or ``"vmap"`` (``chunk_size``
    tasks at a time, ``None``: all). ``channels_last`` (loop only): each task's images and 2-D convolution weights
    are handed to the per-task function in channels-last memory format (same values, same gradients to rounding;
    on a CPU torch's pooling and BatchNorm kernels run several times faster on that layout).

    Example:
        >>> str(StepPlan("vmap", 8)), str(StepPlan("loop", workers=2)), str(StepPlan("loop", channels_last=True))
        ('vmap, chunks of 8', 'loop, 2 tasks at once', 'loop, channels-last')
    """

    mode: str
    chunk_size: int | None = None
    workers: int = 1
    channels_last: bool = False

    def __str__(self) -> str:
        if self.mode == "loop":
            way = "loop" if self.workers == 1 else f"loop, {self.workers} tasks at once"
            return way + (", channels-last" if self.channels_last else "")
        return "vmap" if self.chunk_size is None else f"vmap, chunks of {self.chunk_size}"


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a meta-step on ``device``: the free CUDA memory, or ``MemAvailable`` on a CPU (None if unknown).

    Example:
        >>> isinstance(available_memory(torch.device("cpu")), (int, type(None)))
        True
    """
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:  # pragma: no cover - a device without memory queries
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        return None
    return None  # pragma: no cover


def plan_key(params: Params, tasks: Task) -> Hashable:
    """What a plan is kept for (each step has its own planner): the shapes and dtypes of the parameters and tasks,
    the device, the grad mode and the thread count.

    Example:
        >>> from metafunc import Task
        >>> tasks = Task(*[torch.zeros(4, 5, 1)] * 4)
        >>> fewer = Task(*(t[:2] for t in tasks))
        >>> plan_key({}, tasks) == plan_key({}, tasks), plan_key({}, tasks) == plan_key({}, fewer)
        (True, False)
    """
    weights = tuple((k, tuple(v.shape), v.dtype, v.requires_grad) for k, v in params.items() if isinstance(v, Tensor))
    inputs = tuple((tuple(t.shape), t.dtype) for t in tasks)
    return (weights, inputs, str(tasks.support_x.device), torch.is_grad_enabled(),
            torch.get_num_threads())


def candidate_plans(per_task: Callable, params: Params, tasks: Task, *, chunk_size: int | None = None,
                    workers: int | None = None, loop_workers: int = 1,
                    channels_last: bool | None = None) -> list[StepPlan]:
    """The ways ``mode="auto"`` tries for these tasks, the device's usual best first: on a CPU the loop
    (``loop_workers`` tasks at once, then one), on a GPU ``vmap``; ``vmap`` over all tasks and over chunks of a half
    and a quarter of them (or ``chunk_size`` only), each within the memory bound; the loop always. For images on a
    CPU (:func:`channels_last_applies`) each loop is tried in channels-last format too, first (``channels_last``
    True or False: that format only). A single task, a call inside a ``torch.func`` transform, or ``workers``
    given: the loop alone.

    Example:
        >>> from metafunc import Task
        >>> [str(p) for p in candidate_plans(lambda p, t: t.query_x.sum(), {}, Task(*[torch.zeros(8, 5, 1)] * 4))]
        ['loop', 'vmap', 'vmap, chunks of 4', 'vmap, chunks of 2']
        >>> images = Task(torch.zeros(8, 5, 1, 28, 28), torch.zeros(8, 5), torch.zeros(8, 5, 1, 28, 28), torch.zeros(8, 5))
        >>> [str(p) for p in candidate_plans(lambda p, t: t.query_x.sum(), {"w": torch.zeros(4, 1, 3, 3)}, images,
        ...                                  workers=1)]
        ['loop, channels-last', 'loop']
    """
    n = tasks.num_tasks
    formats = [channels_last] if channels_last is not None else (
        [True, False] if channels_last_applies(params, tasks) else [False])
    if workers is not None or n <= 1 or under_func_transform():
        return [StepPlan("loop", workers=min(workers or 1, max(n, 1)), channels_last=f) for f in formats]
    loops = [StepPlan("loop", workers=w, channels_last=f) for f in formats
             for w in ([loop_workers, 1] if loop_workers > 1 else [1])]
    if channels_last:
        return loops
    vmaps = [StepPlan("vmap", c) for c in _vmap_chunks(params, tasks, chunk_size)] if vmap_runs(
        per_task, params, tasks) else []
    return vmaps + loops if tasks.support_x.device.type == "cuda" else loops + vmaps


def channels_last_applies(params: Params, tasks: Task) -> bool:
    """Whether ``mode="auto"`` also tries the channels-last loop: images (inputs of shape tasks x examples x
    channels x height x width) on a CPU, and a floating 4-D parameter (a 2-D convolution's weight).

    Example:
        >>> from metafunc import Task
        >>> images = Task(torch.zeros(2, 5, 1, 28, 28), torch.zeros(2, 5), torch.zeros(2, 5, 1, 28, 28), torch.zeros(2, 5))
        >>> channels_last_applies({"w": torch.zeros(4, 1, 3, 3)}, images), channels_last_applies({}, images)
        (True, False)
    """
    if tasks.support_x.device.type != "cpu" or tasks.support_x.dim() != 5 or tasks.query_x.dim() != 5:
        return False
    return any(isinstance(v, Tensor) and v.dim() == 4 and v.is_floating_point() for v in params.values())


def _vmap_chunks(params: Params, tasks: Task, chunk_size: int | None) -> list[int | None]:
    """Chunk sizes to try under ``vmap`` (``None``: all tasks), those whose estimated memory fits."""
    n = tasks.num_tasks
    sizes: list[int | None] = [chunk_size] if chunk_size is not None else [None] + sorted(
        {c for c in (n // 2, n // 4) if 2 <= c < n}, reverse=True)
    free = available_memory(tasks.support_x.device)
    if free is None:
        return sizes
    fraction = AUTO_VMAP_MEMORY_FRACTION if tasks.support_x.device.type == "cuda" else AUTO_CPU_MEMORY_FRACTION
    fits = int(free * fraction // task_memory_estimate(params, tasks))
    kept = [c for c in sizes if (c or n) <= fits]
    if not kept and fits >= 2 and chunk_size is None:
        kept = [fits]
    return kept


@dataclasses.dataclass
class _Search:
    candidates: list[StepPlan]
    seconds: dict[StepPlan, list[float]] = dataclasses.field(default_factory=dict)
    skipped: dict[StepPlan, str] = dataclasses.field(default_factory=dict)
    chosen: StepPlan | None = None

    def next_plan(self) -> StepPlan:
        """The chosen plan, else the live candidate timed least often (in order), else a contender still to be
        confirmed (within twice ``AUTO_TIE`` of the fastest, ``AUTO_CONFIRM`` more trials), else the choice now made."""
        if self.chosen is not None:
            return self.chosen
        live = [c for c in self.candidates if c not in self.skipped]
        pending = [c for c in live if len(self.seconds.get(c, [])) < AUTO_TRIALS]
        if pending:
            return min(pending, key=lambda c: len(self.seconds.get(c, [])))
        fastest = min(min(self.seconds[c]) for c in live)
        contenders = [c for c in live if min(self.seconds[c]) <= fastest * (1 + 2 * AUTO_TIE)]
        unconfirmed = [c for c in contenders if len(self.seconds[c]) < AUTO_TRIALS + AUTO_CONFIRM]
        if len(contenders) > 1 and unconfirmed:
            return min(unconfirmed, key=lambda c: len(self.seconds[c]))
        ties = [c for c in live if min(self.seconds[c]) <= fastest * (1 + AUTO_TIE)]
        self.chosen = min(ties, key=lambda c: (_tasks_in_flight(c), min(self.seconds[c])))
        return self.chosen

    def skip(self, plan: StepPlan, error: Exception) -> None:
        """Drop a candidate that raised: a channels-last loop drops every channels-last one (a ``view`` the layout
        does not allow); under ``vmap`` out of memory drops it and every larger chunk, any other error (no batching
        rule, data-dependent control flow, randomness) every ``vmap`` candidate."""
        why = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
        if plan.channels_last:
            for c in self.candidates:
                if c.channels_last:
                    self.skipped.setdefault(c, why)
            return
        memory = isinstance(error, torch.OutOfMemoryError)
        if memory and torch.cuda.is_available():
            torch.cuda.empty_cache()
        size = plan.chunk_size or float("inf")
        for c in self.candidates:
            if c.mode == "vmap" and (not memory or (c.chunk_size or float("inf")) >= size):
                self.skipped.setdefault(c, why)


class AutoPlanner:
    """The plans ``mode="auto"`` measured and chose, one search per :func:`plan_key`.

    ``run(key, candidates, run_plan)`` runs one call with the next plan: a candidate still being timed (timed here,
    with a CUDA synchronisation), or the chosen one (not timed). ``plan(key)`` is the choice (None while measuring),
    ``report(key)`` the timings and skipped candidates.

    Example:
        >>> planner = AutoPlanner()
        >>> speed = {"loop": 0.02, "vmap": 0.001}
        >>> def run(plan):
        ...     time.sleep(speed[plan.mode])
        ...     return plan.mode
        >>> [planner.run("key", lambda: [StepPlan("loop"), StepPlan("vmap")], run)[0] for _ in range(5)]
        ['loop', 'vmap', 'loop', 'vmap', 'vmap']
        >>> str(planner.plan("key"))
        'vmap'
    """

    def __init__(self) -> None:
        self._searches: dict[Hashable, _Search] = {}
        self._last: Hashable = None

    def plan(self, key: Hashable = None) -> StepPlan | None:
        """The plan chosen for ``key`` (default: the last call's); None while it is measured or never seen."""
        search = self._searches.get(self._last if key is None else key)
        return None if search is None else search.chosen

    def candidates(self, key: Hashable = None) -> list[StepPlan]:
        """The candidates that ran for ``key`` (default: the last call's), skipped ones left out."""
        search = self._searches[self._last if key is None else key]
        return [c for c in search.candidates if c not in search.skipped]

    def report(self, key: Hashable = None) -> dict[str, Any]:
        """The candidates, the best seconds of each measured one, the skipped ones with why, and the choice, for
        ``key`` (default: the last call's)."""
        search = self._searches[self._last if key is None else key]
        return {"candidates": [str(c) for c in search.candidates],
                "chosen": None if search.chosen is None else str(search.chosen),
                "seconds": {str(p): min(s) for p, s in search.seconds.items() if s},
                "skipped": {str(p): why for p, why in search.skipped.items()}}

    def run(self, key: Hashable, candidates: Callable[[], list[StepPlan]],
            run_plan: Callable[[StepPlan], R]) -> tuple[R, StepPlan]:
        search = self._searches.get(key)
        if search is None:
            search = self._searches[key] = _Search(candidates())
        self._last = key
        while True:
            plan = search.next_plan()
            if search.chosen is not None:
                return run_plan(plan), plan
            try:
                result, seconds = _timed(run_plan, plan)
            except (RuntimeError, ValueError, NotImplementedError) as error:
                if plan.mode != "vmap" and not plan.channels_last:
                    raise   # the loop is the fallback: its error is the user's to see
                search.skip(plan, error)
                continue
            search.seconds.setdefault(plan, []).append(seconds)
            return result, plan


def _tasks_in_flight(plan: StepPlan) -> float:
    if plan.mode == "loop":
        return plan.workers
    return float("inf") if plan.chunk_size is None else plan.chunk_size


def _timed(run_plan: Callable[[StepPlan], R], plan: StepPlan) -> tuple[R, float]:
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run_plan(plan)
    if cuda:
        torch.cuda.synchronize()
    return result, time.perf_counter() - start
