"""Meta-training across processes with ``torch.distributed``: the meta-batch is sharded, the meta-gradient is not.

Distribution is an outer transform. Algorithms never import ``torch.distributed``; this module does. Each rank draws
its own share of the meta-batch, computes the meta-gradient of its share with any learner or gradient path, and one
all-reduce weighted by the number of tasks on each rank turns the shares into the meta-gradient of the whole
meta-batch, equal to the single-process one (uneven splits too)::

    info = init_distributed(timeout=60)                           # reads torchrun's RANK / WORLD_SIZE / ...
    step = sharded(meta_value_and_grad(learner))                  # any meta-step, distributed
    tasks = sample_shard(sampler, 32, seed=0, step=it, rank=info.rank, world_size=info.world_size)
    loss, metrics, grads = step(params, tasks)                    # the whole meta-batch's, on every rank
    apply_grads(params, grads)
    optimizer.step()

Episodes are keyed by ``(seed, step, task index)``, so the whole meta-batch of a step is the same for any number of
ranks: 2 ranks reproduce 1 process, and a run resumed with another number of ranks continues the same run.

A rank that dies, hangs or is stopped makes every collective of the others fail within ``timeout`` seconds with a
:class:`DistributedError` that names the collective, the rank and the cause (gloo reports a dead peer at once and a
hung one after the timeout; NCCL's watchdog aborts after the timeout).
"""

from __future__ import annotations

import datetime
import math
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, NamedTuple, Sequence, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from metafunc._shared import check_choice
from metafunc.core.types import Metrics, Params, Task, check_task

__all__ = [
    "DistInfo",
    "DistributedError",
    "DEFAULT_TIMEOUT",
    "BACKENDS",
    "init_distributed",
    "shutdown_distributed",
    "distributed_info",
    "is_main_process",
    "shard_sizes",
    "shard_range",
    "shard_tasks",
    "task_seed",
    "sample_shard",
    "ShardedSource",
    "all_reduce_meta_grads",
    "sharded",
    "broadcast_object",
    "any_rank",
    "barrier",
]

DEFAULT_TIMEOUT = 300.0
"""Seconds a collective waits for the other ranks before it fails (``--dist-timeout`` in the CLI)."""

BACKENDS = ("auto", "gloo", "nccl")


class DistributedError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the rendezvous could not be reached.

    Example:
        >>> isinstance(DistributedError("all_reduce failed"), RuntimeError)
        True
    """


class DistInfo(NamedTuple):
    """Where this process stands: its ``rank`` among ``world_size`` processes, its ``local_rank`` on its machine,
    the ``backend`` (``None`` for a single process without a process group), its ``device`` and the collective
    ``timeout`` in seconds.

    Example:
        >>> info = DistInfo(0, 1, 0, None, torch.device("cpu"), 300.0)
        >>> info.is_main, info.distributed
        (True, False)
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device
    timeout: float

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes logs, plots and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is up (``world_size > 1`` under ``torchrun``)."""
        return self.backend is not None


_INFO: DistInfo | None = None


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"init_distributed: environment variable {name} must be an int (got {value!r})") from None


def _check_timeout(caller: str, timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{caller}: timeout must be a number of seconds (got {type(timeout).__name__} {timeout!r})")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"{caller}: timeout must be > 0 seconds (got {timeout}); e.g. --dist-timeout 60")
    return float(timeout)


def _import_modules_that_bind_the_world_group() -> None:
    """Import, before the process group exists, the torch modules that capture ``group.WORLD`` at import time.

    ``torch.distributed.nn.functional`` declares ten functions with the default argument ``group=group.WORLD``, and
    ``torch._dynamo`` imports it (lazily, on the first optimizer step or ``torch.func`` call that touches it). Imported
    after ``init_process_group``, those defaults hold references to the world process group, so
    ``destroy_process_group`` cannot free it and gloo's worker threads live on into interpreter shutdown. There the
    worker that frees the last collective's work object must take the GIL to drop its Python tensors, finds the
    interpreter finalizing, and its thread is unwound through a ``noexcept`` destructor: ``terminate called without
    an active exception`` (SIGABRT), about one two-process run in five. Imported first, the defaults are ``None``,
    the group is freed by ``shutdown_distributed`` and its threads are joined before exit."""
    import torch.distributed.nn.functional  # noqa: F401


def init_distributed(
    *,
    backend: Literal["auto", "gloo", "nccl"] = "auto",
    timeout: float = DEFAULT_TIMEOUT,
    device: str | torch.device | None = None,
) -> DistInfo:
    """Join the process group that ``torchrun`` (or any launcher setting ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``) describes, and return this process's :class:`DistInfo`.

    Without those variables (a plain ``python`` run) nothing is initialised and a single-process ``DistInfo`` comes
    back, so the same training code runs with or without ``torchrun``. ``backend="auto"`` picks NCCL when the
    device is a GPU (each rank takes ``cuda:LOCAL_RANK``) and gloo otherwise. ``timeout`` (seconds) bounds every
    collective: when a rank dies or hangs, the others raise :class:`DistributedError` within it instead of waiting
    forever. Calling it again returns the same ``DistInfo``.

    Example:
        >>> info = init_distributed(timeout=60)     # under torchrun --nproc_per_node=2: ranks 0 and 1, gloo on CPU
        >>> info.world_size >= 1
        True
    """
    global _INFO
    check_choice("init_distributed", "backend", backend, BACKENDS)
    timeout = _check_timeout("init_distributed", timeout)
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"init_distributed: device must be None, a string or a torch.device (got {device!r})")
    if _INFO is not None and _INFO.distributed and dist.is_initialized():
        return _INFO
    world_size = _env_int("WORLD_SIZE", None)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    wanted = torch.device(device) if device is not None else None
    if world_size is None or world_size == 1:
        dev = wanted if wanted is not None else torch.device("cpu")
        _INFO = DistInfo(0, 1, 0, None, dev, timeout)
        return _INFO
    if world_size < 1 or not 0 <= rank < world_size:  # type: ignore[operator]
        raise ValueError(f"init_distributed: RANK={rank} is not in [0, WORLD_SIZE={world_size}); check the launcher")
    if not dist.is_available():
        raise RuntimeError("init_distributed: this torch build has no torch.distributed; install a standard wheel")
    use_cuda = wanted.type == "cuda" if wanted is not None else (backend == "nccl" or (
        backend == "auto" and torch.cuda.is_available()))
    if backend == "auto":
        backend = "nccl" if use_cuda and dist.is_nccl_available() else "gloo"
    if backend == "nccl" and not use_cuda:
        raise ValueError(f"init_distributed: backend='nccl' needs a CUDA device (got device={device!r}); "
                         "use backend='gloo' on CPU")
    if use_cuda:
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError("init_distributed: a CUDA device was asked for but none is visible; use device='cpu'")
        if wanted is not None and wanted.index is not None:
            dev = wanted
        else:
            if local_rank >= count:  # type: ignore[operator]
                raise ValueError(f"init_distributed: LOCAL_RANK={local_rank} but this machine has {count} GPUs; "
                                 f"launch at most --nproc_per_node={count}")
            dev = torch.device("cuda", int(local_rank or 0))
        torch.cuda.set_device(dev)
    else:
        dev = wanted if wanted is not None else torch.device("cpu")
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout)}
    if backend == "nccl":
        kwargs["device_id"] = dev
    _import_modules_that_bind_the_world_group()
    try:
        dist.init_process_group(**kwargs)
    except Exception as e:  # rendezvous failures come as RuntimeError, DistStoreError, TimeoutError, ...
        raise DistributedError(
            f"init_distributed: rank {rank} of {world_size} could not join the process group at "
            f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} ({backend}, timeout "
            f"{timeout:g}s): {e}. Check that every rank was started with the same rendezvous arguments"
        ) from e
    _INFO = DistInfo(rank, world_size, local_rank, backend, dev, timeout)  # type: ignore[arg-type]
    return _INFO


def shutdown_distributed() -> None:
    """Leave the process group (if any); safe to call in a single process or twice.

    Example:
        >>> shutdown_distributed()
    """
    global _INFO
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _INFO = None


def distributed_info() -> DistInfo:
    """The :class:`DistInfo` of this process: the one :func:`init_distributed` returned, or a single CPU process.

    Example:
        >>> distributed_info().world_size >= 1
        True
    """
    if _INFO is not None:
        return _INFO
    if dist.is_available() and dist.is_initialized():  # a process group set up by the user
        backend = dist.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0) or 0, backend, dev,
                        DEFAULT_TIMEOUT)
    return DistInfo(0, 1, 0, None, torch.device("cpu"), DEFAULT_TIMEOUT)


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): guard logs, plots and checkpoints with it.

    Example:
        >>> is_main_process()
        True
    """
    return distributed_info().rank == 0


def _check_world(caller: str, rank: Any, world_size: Any) -> None:
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{caller}: {name} must be an int (got {type(value).__name__} {value!r})")
    if world_size < 1:
        raise ValueError(f"{caller}: world_size must be >= 1 (got {world_size})")
    if not 0 <= rank < world_size:
        raise ValueError(f"{caller}: rank must be in [0, {world_size}) for world_size={world_size} (got {rank})")


def shard_sizes(meta_batch: int, world_size: int) -> list[int]:
    """How many tasks each rank holds: as even as possible, the first ``meta_batch % world_size`` ranks one more.

    Every rank needs at least one task, so ``meta_batch >= world_size``.

    Example:
        >>> shard_sizes(5, 2)
        [3, 2]
    """
    if isinstance(meta_batch, bool) or not isinstance(meta_batch, int):
        raise TypeError(f"shard_sizes: meta_batch must be an int (got {type(meta_batch).__name__} {meta_batch!r})")
    _check_world("shard_sizes", 0, world_size)
    if meta_batch < world_size:
        raise ValueError(f"shard_sizes: meta_batch={meta_batch} is smaller than world_size={world_size}, so some rank "
                         f"would hold no task; use --meta-batch >= {world_size} or fewer processes")
    base, extra = divmod(meta_batch, world_size)
    return [base + (r < extra) for r in range(world_size)]


def shard_range(meta_batch: int, rank: int, world_size: int) -> range:
    """The global task indices that ``rank`` holds (consecutive; the shards tile ``range(meta_batch)``).

    Example:
        >>> shard_range(5, 1, 2)
        range(3, 5)
    """
    _check_world("shard_range", rank, world_size)
    sizes = shard_sizes(meta_batch, world_size)
    start = sum(sizes[:rank])
    return range(start, start + sizes[rank])


def shard_tasks(tasks: Task, rank: int, world_size: int) -> Task:
    """This rank's share of an already drawn meta-batch (see :func:`shard_range`).

    Example:
        >>> tasks = Task(*(torch.zeros(5, 2, 1) for _ in range(4)))
        >>> shard_tasks(tasks, 1, 2).num_tasks
        2
    """
    tasks = check_task(tasks, caller="shard_tasks")
    r = shard_range(tasks.num_tasks, rank, world_size)
    return Task(*(t[r.start:r.stop] for t in tasks))


def task_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for task ``index`` of meta-step ``step`` of a run seeded with ``seed`` (numpy ``SeedSequence``
    mixing, so nearby seeds, steps and indices give unrelated streams).

    Example:
        >>> task_seed(0, 0, 0) == task_seed(0, 0, 0) != task_seed(0, 0, 1)
        True
    """
    for name, value in (("seed", seed), ("step", step), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"task_seed: {name} must be an int >= 0 (got {value!r})")
    words = np.random.SeedSequence(entropy=seed, spawn_key=(step, index)).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def sample_shard(
    sampler: Any,
    meta_batch: int,
    *,
    seed: int,
    step: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
) -> Task:
    """Draw this rank's share of meta-step ``step``'s meta-batch of ``meta_batch`` tasks.

    Task ``i`` of the step is drawn with its own ``torch.Generator`` seeded by ``task_seed(seed, step, i)``, so each
    rank's episode stream is distinct and reproducible from the one ``seed``, and the whole meta-batch (the
    concatenation of the shards) does not depend on ``world_size``: 2 ranks see the tasks 1 process sees, and a
    run resumed with another number of ranks draws the tasks it would have drawn. ``sampler`` is a callable
    ``sampler(num_tasks, generator) -> Task`` or an object with ``.sample(num_tasks, generator)``; ``device`` is
    where the generators live (the sampler's device).

    Example:
        >>> from metafunc import sinusoid_tasks
        >>> draw = lambda n, g: sinusoid_tasks(n, shots=5, generator=g)
        >>> shards = [sample_shard(draw, 5, seed=0, step=0, rank=r, world_size=2) for r in range(2)]
        >>> whole = sample_shard(draw, 5, seed=0, step=0)
        >>> torch.equal(torch.cat([s.support_x for s in shards]), whole.support_x)
        True
    """
    draw = getattr(sampler, "sample", sampler)
    if not callable(draw):
        raise TypeError("sample_shard: sampler must be callable as sampler(num_tasks, generator) or have "
                        f".sample(num_tasks, generator) (got {type(sampler).__name__})")
    indices = shard_range(meta_batch, rank, world_size)
    task_seed(seed, step, 0)  # validates seed and step
    parts = []
    for i in indices:
        generator = torch.Generator(device=device).manual_seed(task_seed(seed, step, i))
        part = draw(1, generator)
        parts.append(check_task(part, caller="sample_shard"))
    return Task(*(torch.cat(fields) for fields in zip(*parts)))


class ShardedSource:
    """A task source that draws only this rank's share of each meta-batch: ``sample(meta_batch, generator)``.

    Each call takes one seed from ``generator`` (so the generator advances identically on every rank and a
    checkpoint's generator state is valid for any number of ranks), then draws task ``i`` of the meta-batch with
    its own generator seeded by ``task_seed(seed, 0, i)`` for the indices of :func:`shard_range`. The concatenation
    of the shards of all ranks is the same meta-batch for any ``world_size``, so a run with 2 ranks equals one with
    1 rank, and ``--resume`` with another number of ranks continues the same run.

    Example:
        >>> from metafunc import sinusoid_tasks
        >>> draw = lambda n, g: sinusoid_tasks(n, shots=5, generator=g)
        >>> shards = [ShardedSource(draw, rank=r, world_size=2).sample(5, torch.Generator().manual_seed(0))
        ...           for r in range(2)]
        >>> whole = ShardedSource(draw).sample(5, torch.Generator().manual_seed(0))
        >>> [s.num_tasks for s in shards], torch.equal(torch.cat([s.query_y for s in shards]), whole.query_y)
        ([3, 2], True)
    """

    def __init__(self, source: Any, *, rank: int = 0, world_size: int = 1):
        draw = getattr(source, "sample", source)
        if not callable(draw):
            raise TypeError("ShardedSource: source must have .sample(num_tasks, generator) or be callable as "
                            f"source(num_tasks, generator) (got {type(source).__name__})")
        _check_world("ShardedSource", rank, world_size)
        self.source, self.rank, self.world_size = source, rank, world_size

    def sample(self, meta_batch: int, generator: torch.Generator) -> Task:
        """This rank's share of a meta-batch of ``meta_batch`` tasks (on the generator's device)."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"ShardedSource.sample: generator must be a torch.Generator (got {type(generator).__name__})")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        return sample_shard(self.source, meta_batch, seed=seed, step=0, rank=self.rank, world_size=self.world_size,
                            device=generator.device)

    def __repr__(self) -> str:
        return f"ShardedSource({self.source!r}, rank={self.rank}, world_size={self.world_size})"


@contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except DistributedError:
        raise
    except Exception as e:  # gloo raises RuntimeError; NCCL DistBackendError; store failures DistStoreError
        info = distributed_info()
        raise DistributedError(
            f"metafunc.distributed: {what} failed on rank {info.rank} of {info.world_size} ({info.backend}, timeout "
            f"{info.timeout:g}s): another rank died, hung or stopped answering. Stop the job, then restart it with "
            f"--resume from the last complete checkpoint. Cause: {str(e).strip()}"
        ) from e


def _check_tree(caller: str, params: Any) -> Params:
    if not isinstance(params, dict) or not params:
        raise TypeError(f"{caller}: params must be a non-empty dict of tensors, as from functionalize "
                        f"(got {type(params).__name__})")
    bad = [k for k, v in params.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"{caller}: params must hold tensors; {bad[:5]} are not")
    return params


def _check_count(caller: str, num_tasks: Any) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
        raise TypeError(f"{caller}: num_tasks must be an int, the number of tasks on this rank "
                        f"(got {type(num_tasks).__name__} {num_tasks!r}); pass tasks.num_tasks")
    if num_tasks < 1:
        raise ValueError(f"{caller}: num_tasks must be >= 1 (got {num_tasks}); every rank needs a task")
    return num_tasks


def _weighted_mean(grads: Sequence[Tensor], num_tasks: int, loss: Tensor | None, metrics: Metrics,
                   group: Any) -> tuple[list[Tensor], Tensor | None, Metrics]:
    """Sum over ranks of ``num_tasks * value``, divided by the total number of tasks, for every value at once."""
    info = distributed_info()
    if info.world_size == 1 and group is None:
        return list(grads), loss, dict(metrics)
    device = info.device
    names = sorted(metrics)
    scalars = [loss] if loss is not None else []
    scalars += [metrics[k] for k in names]
    stats = torch.stack([torch.as_tensor(s).detach().to(device=device, dtype=torch.float64).reshape(())
                         for s in scalars] + [torch.ones((), dtype=torch.float64, device=device)]) * num_tasks
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        by_dtype.setdefault(g.dtype, []).append(i)
    flats = {dt: torch.cat([grads[i].detach().reshape(-1) for i in idx]).to(device) * num_tasks
             for dt, idx in by_dtype.items()}
    with _collective(f"all_reduce of the meta-gradient ({sum(g.numel() for g in grads)} values)"):
        for flat in flats.values():
            dist.all_reduce(flat, group=group)
        dist.all_reduce(stats, group=group)
    total = stats[-1]
    out: list[Tensor] = [torch.empty(0)] * len(grads)
    for dt, idx in by_dtype.items():
        flat = flats[dt] / total.to(dt)
        offset = 0
        for i in idx:
            n = grads[i].numel()
            out[i] = flat[offset:offset + n].view_as(grads[i]).to(grads[i].device)
            offset += n
    means = stats[:-1] / total
    new_loss = means[0].to(dtype=loss.dtype, device=loss.device) if loss is not None else None
    rest = means[1:] if loss is not None else means
    new_metrics = {k: rest[j].to(dtype=torch.as_tensor(metrics[k]).dtype, device=torch.as_tensor(metrics[k]).device)
                   for j, k in enumerate(names)}
    return out, new_loss, new_metrics


def all_reduce_meta_grads(
    params: Params,
    num_tasks: int,
    loss: Tensor | None = None,
    metrics: Metrics | None = None,
    *,
    group: Any = None,
) -> tuple[Tensor | None, Metrics]:
    """After ``loss.backward()`` on this rank's share, replace every ``.grad`` in ``params`` by the meta-gradient of
    the whole meta-batch: ``sum_r num_tasks_r * grad_r / sum_r num_tasks_r`` (one all-reduce per dtype).

    With ``meta_batch(..., reduce="mean")`` on each shard this equals the single-process gradient of the mean over
    all tasks, for uneven shards too. ``loss`` and ``metrics`` (shard means) come back as whole-batch means. A
    parameter without a gradient counts as zero. In a single process nothing is communicated.

    Example:
        >>> from metafunc import functionalize, maml, meta_batch, sinusoid_tasks
        >>> model, params = functionalize(torch.nn.Linear(1, 1))
        >>> learner = maml(model, inner_lr=0.01, loss="mse")
        >>> tasks = sinusoid_tasks(4, shots=5, generator=torch.Generator().manual_seed(0))
        >>> loss, metrics = meta_batch(learner.meta_loss)(params, tasks)
        >>> loss.backward()
        >>> loss, metrics = all_reduce_meta_grads(params, tasks.num_tasks, loss, metrics)
    """
    _check_tree("all_reduce_meta_grads", params)
    _check_count("all_reduce_meta_grads", num_tasks)
    if metrics is not None and not isinstance(metrics, dict):
        raise TypeError(f"all_reduce_meta_grads: metrics must be a dict of scalars (got {type(metrics).__name__})")
    tensors = list(params.values())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tensors]
    reduced, loss, out_metrics = _weighted_mean(grads, num_tasks, loss.detach() if loss is not None else None,
                                                metrics or {}, group)
    for p, g in zip(tensors, reduced):
        p.grad = g
    return loss, out_metrics


def sharded(step: Callable[[Params, Task], tuple[Tensor, Metrics, Params]], *, group: Any = None
            ) -> Callable[[Params, Task], tuple[Tensor, Metrics, Params]]:
    """Distribute any meta-step: ``sharded(step)(params, shard)`` runs ``step`` on this rank's share of the
    meta-batch, then one all-reduce weighted by the number of tasks on each rank, and returns ``(loss, metrics,
    grads)`` of the **whole** meta-batch on every rank: the same numbers as ``step`` on the whole meta-batch in one
    process (uneven shards too), up to the order of a floating-point sum.

    ``step`` is any meta-step of the ``step(params, tasks) -> (loss, metrics, grads)`` contract
    (:func:`metafunc.meta_value_and_grad`, :func:`metafunc.compiled_meta_step`, ...). In a single process nothing is
    communicated.

    Example:
        >>> from metafunc import functionalize, maml, meta_value_and_grad, sinusoid_tasks
        >>> model, params = functionalize(torch.nn.Linear(1, 1))
        >>> step = sharded(meta_value_and_grad(maml(model, inner_lr=0.01, loss="mse")))
        >>> tasks = sinusoid_tasks(4, shots=5, generator=torch.Generator().manual_seed(0))
        >>> loss, metrics, grads = step(params, tasks)
        >>> sorted(grads) == sorted(params)
        True
    """
    if not callable(step):
        raise TypeError(f"sharded: step must be a meta-step step(params, tasks) -> (loss, metrics, grads) "
                        f"(got {type(step).__name__})")

    def run(params: Params, tasks: Task) -> tuple[Tensor, Metrics, Params]:
        _check_tree("sharded", params)
        tasks = check_task(tasks, caller="sharded")
        out = step(params, tasks)
        if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], dict)):
            raise TypeError("sharded: step must return (loss, metrics, grads) with grads a dict like params, as "
                            f"metafunc.meta_value_and_grad does (got {type(out).__name__})")
        loss, metrics, grads = out
        names = list(grads)
        reduced, whole_loss, metrics = _weighted_mean([grads[k].detach() for k in names], tasks.num_tasks,
                                                      loss.detach(), dict(metrics), group)
        return cast(Tensor, whole_loss), metrics, dict(zip(names, reduced))

    run.__name__ = f"sharded_{getattr(step, '__name__', 'step')}"
    return run


def broadcast_object(obj: Any, src: int = 0, *, group: Any = None) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; tensors included). Rank 0 loads a checkpoint and broadcasts
    it, so the other ranks need no shared file system; a single process gets ``obj`` back.

    Example:
        >>> broadcast_object({"step": 3})
        {'step': 3}
    """
    info = distributed_info()
    if info.world_size == 1 and group is None:
        return obj
    box = [obj if info.rank == src else None]
    with _collective("broadcast"):
        dist.broadcast_object_list(box, src=src, group=group, device=info.device if info.backend == "nccl" else None)
    return box[0]


def any_rank(*flags: bool, group: Any = None) -> tuple[bool, ...]:
    """Each of ``flags``, true on every rank if it is true on any rank (one all-reduce of a few numbers; the flags
    themselves in a single process). The trainer calls it once after each meta-step, so a stop signal to one rank
    (or the time budget running out on one) stops all of them at the same step.

    Example:
        >>> any_rank(True, False)
        (True, False)
    """
    info = distributed_info()
    if not info.distributed and group is None:
        return tuple(bool(f) for f in flags)
    box = torch.tensor([1.0 if f else 0.0 for f in flags], device=info.device)
    with _collective("all_reduce of the stop flag"):
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=group)
    return tuple(bool(v > 0) for v in box.tolist())


def barrier(*, group: Any = None) -> None:
    """Wait for every rank, at most the timeout; with gloo a monitored barrier names the ranks that did not come.

    Example:
        >>> barrier()     # returns at once in a single process
    """
    info = distributed_info()
    if not info.distributed:
        return
    with _collective("barrier"):
        if info.backend == "gloo":
            dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=info.timeout), wait_all_ranks=True)
        else:
            dist.barrier(group=group)
