"""Shard arithmetic and seeding: which tasks of a meta-batch each rank holds, and how each task is drawn so that the
whole meta-batch is the same for any number of ranks. Nothing here communicates.

Example:
    >>> shard_sizes(5, 2), shard_range(5, 1, 2)
    ([3, 2], range(3, 5))
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from metafunc.core.types import Task, check_task

__all__ = ["shard_sizes", "shard_range", "shard_tasks", "task_seed", "sample_shard", "ShardedSource"]


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
