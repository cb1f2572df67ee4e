"""The collectives metafunc uses, each a no-op in a single process, each failing with a :class:`DistributedError` that
names the collective, the rank and the cause when another rank died or hung (instead of waiting forever).

Example:
    >>> any_rank(False, True), broadcast_object([1, 2])
    ((False, True), [1, 2])
"""

from __future__ import annotations

import datetime
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from metafunc.distributed.group import DistributedError, distributed_info

__all__ = ["weighted_all_reduce", "broadcast_object", "any_rank", "barrier"]


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


def _check_reduce_args(tensors: Any, weight: Any) -> list[Tensor]:
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise TypeError(f"weighted_all_reduce: weight must be an int, e.g. the number of tasks on this rank "
                        f"(got {type(weight).__name__} {weight!r}); pass tasks.num_tasks")
    if weight < 1:
        raise ValueError(f"weighted_all_reduce: weight must be >= 1 (got {weight}); every rank needs a task")
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"weighted_all_reduce: tensors must be a list of tensors (got {type(tensors).__name__})")
    bad = [i for i, t in enumerate(tensors) if not (isinstance(t, Tensor) and t.is_floating_point())]
    if bad:
        raise TypeError(f"weighted_all_reduce: tensors must be floating-point tensors; those at {bad[:5]} are not")
    return [t.detach() for t in tensors]


def weighted_all_reduce(tensors: Sequence[Tensor], weight: int, *, group: Any = None,
                        what: str = "weighted all_reduce") -> list[Tensor]:
    """``sum_r weight_r * t_r / sum_r weight_r`` over the ranks ``r``, for each of ``tensors`` (every rank passes
    tensors of the same shapes and dtypes in the same order): one all-reduce per dtype, each result in its input's
    dtype and on its device. ``what`` names the collective in the error raised when another rank fails. In a single
    process the tensors come back (detached) as they are.

    :func:`sharded` reduces a meta-step's gradients, loss and metrics with it, weighted by each rank's task count.

    Example:
        >>> weighted_all_reduce([torch.tensor([1.0, 2.0])], 3)
        [tensor([1., 2.])]
    """
    tensors = _check_reduce_args(tensors, weight)
    info = distributed_info()
    if info.world_size == 1 and group is None:
        return tensors
    by_dtype: dict[torch.dtype, list[int]] = {torch.float64: []}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    flats: dict[torch.dtype, Tensor] = {}
    for dt, idx in by_dtype.items():
        parts = [tensors[i].reshape(-1).to(info.device) for i in idx]
        if dt == torch.float64:
            parts.append(torch.ones(1, dtype=torch.float64, device=info.device))   # sums to the total weight
        flats[dt] = torch.cat(parts) * weight
    with _collective(what):
        for flat in flats.values():
            dist.all_reduce(flat, group=group)
    total = flats[torch.float64][-1]
    out: list[Tensor] = [torch.empty(0)] * len(tensors)
    for dt, idx in by_dtype.items():
        flat = flats[dt] / total.to(dt)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset:offset + n].view_as(tensors[i]).to(tensors[i].device)
            offset += n
    return out


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
