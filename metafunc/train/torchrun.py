"""The trainer under ``torchrun``: join the process group and give :func:`metafunc.train.train` its distributed
pieces (each rank's share of the meta-batch, the sharded step, the stop flag agreed across ranks, the barrier)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

from metafunc import distributed
from metafunc.train.config import ResolvedConfig, resolve_config

__all__ = ["TorchrunRun", "join_torchrun"]


class TorchrunRun(NamedTuple):
    """The config as this rank runs it (``cuda:LOCAL_RANK`` on GPUs), whether it is rank 0, the keyword arguments
    for :func:`metafunc.train.train`, and a line describing the process group (``None`` when not distributed).

    Example:
        >>> TorchrunRun(None, True, {}, None).is_main
        True
    """

    config: Any
    is_main: bool
    train_kwargs: dict[str, Any]
    description: str | None


def join_torchrun(cfg: ResolvedConfig, *, backend: str = "auto", timeout: float = 300.0) -> TorchrunRun:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` set); otherwise the run as it is.

    Example:
        >>> from metafunc.train import TrainConfig
        >>> run = join_torchrun(resolve_config(TrainConfig(dataset="synthetic")))  # not under torchrun
        >>> run.is_main, run.train_kwargs
        (True, {})
    """
    if not os.environ.get("WORLD_SIZE"):
        return TorchrunRun(cfg, int(os.environ.get("RANK", "0") or 0) == 0, {}, None)
    world_size = int(os.environ["WORLD_SIZE"])
    if cfg.meta_batch < world_size:  # checked before the rendezvous, so every rank says it at once
        raise ValueError(f"metafunc train: --meta-batch {cfg.meta_batch} is smaller than the {world_size} processes; "
                         "every process needs at least one task")
    info = distributed.init_distributed(backend=backend, timeout=timeout,  # type: ignore[arg-type]
                                        device=cfg.device.split(":")[0])
    if info.device.type == "cuda":
        cfg = resolve_config(dataclasses.replace(cfg, device=str(info.device)))  # rank i: cuda:LOCAL_RANK
    kwargs: dict[str, Any] = dict(wrap_step=distributed.sharded, train_source=lambda src: distributed.ShardedSource(
        src, rank=info.rank, world_size=info.world_size))
    description = None
    if info.distributed:
        kwargs.update(sync_flag=distributed.any_rank, barrier=distributed.barrier)
        description = (f"{info.world_size} processes ({info.backend}), meta-batch {cfg.meta_batch} split "
                       f"{distributed.shard_sizes(cfg.meta_batch, info.world_size)}, timeout {info.timeout:g} s")
    return TorchrunRun(cfg, info.is_main, kwargs, description)
