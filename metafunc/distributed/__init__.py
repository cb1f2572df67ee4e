"""Meta-training across processes with ``torch.distributed``: the meta-batch is sharded, the meta-gradient is not.

Distribution is an outer transform. Algorithms never import ``torch.distributed``; this package does. Each rank draws
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

The modules, one job each: :mod:`~metafunc.distributed.group` (join, leave, where this process stands),
:mod:`~metafunc.distributed.shards` (which tasks each rank draws; nothing communicated),
:mod:`~metafunc.distributed.collectives` (the weighted all-reduce, broadcast, stop flags, barrier) and
:mod:`~metafunc.distributed.step` (``sharded``).
"""

from metafunc.distributed.collectives import any_rank, barrier, broadcast_object, weighted_all_reduce
from metafunc.distributed.group import (
    BACKENDS,
    DEFAULT_TIMEOUT,
    DistInfo,
    DistributedError,
    distributed_info,
    init_distributed,
    is_main_process,
    shutdown_distributed,
)
from metafunc.distributed.shards import ShardedSource, sample_shard, shard_range, shard_sizes, shard_tasks, task_seed
from metafunc.distributed.step import sharded

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
    "weighted_all_reduce",
    "sharded",
    "broadcast_object",
    "any_rank",
    "barrier",
]
