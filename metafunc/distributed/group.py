"""The process group: join the one ``torchrun`` describes, say where this process stands, leave it.

Example:
    >>> distributed_info().world_size >= 1
    True
"""

from __future__ import annotations

import datetime
import math
import os
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist

from metafunc._shared import check_choice

__all__ = ["DistInfo", "DistributedError", "DEFAULT_TIMEOUT", "BACKENDS", "init_distributed", "shutdown_distributed",
           "distributed_info", "is_main_process"]

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


def _cuda_device(wanted: torch.device | None, local_rank: int) -> torch.device:
    """This rank's GPU: ``wanted`` if it names one, else ``cuda:LOCAL_RANK``; made the current device."""
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError("init_distributed: a CUDA device was asked for but none is visible; use device='cpu'")
    if wanted is not None and wanted.index is not None:
        dev = wanted
    elif local_rank >= count:
        raise ValueError(f"init_distributed: LOCAL_RANK={local_rank} but this machine has {count} GPUs; "
                         f"launch at most --nproc_per_node={count}")
    else:
        dev = torch.device("cuda", local_rank)
    torch.cuda.set_device(dev)
    return dev


def _backend_and_device(backend: str, device: str | torch.device | None, local_rank: int) -> tuple[str, torch.device]:
    """The backend ``"auto"`` resolves to (NCCL for a GPU, gloo otherwise) and this rank's device."""
    wanted = torch.device(device) if device is not None else None
    use_cuda = wanted.type == "cuda" if wanted is not None else (backend == "nccl" or (
        backend == "auto" and torch.cuda.is_available()))
    if backend == "auto":
        backend = "nccl" if use_cuda and dist.is_nccl_available() else "gloo"
    if backend == "nccl" and not use_cuda:
        raise ValueError(f"init_distributed: backend='nccl' needs a CUDA device (got device={device!r}); "
                         "use backend='gloo' on CPU")
    if use_cuda:
        return backend, _cuda_device(wanted, local_rank)
    return backend, wanted if wanted is not None else torch.device("cpu")


def _join(backend: str, dev: torch.device, timeout: float, rank: int, world_size: int) -> None:
    """``init_process_group``, its failures (RuntimeError, DistStoreError, TimeoutError, ...) as DistributedError."""
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout)}
    if backend == "nccl":
        kwargs["device_id"] = dev
    _import_modules_that_bind_the_world_group()
    try:
        dist.init_process_group(**kwargs)
    except Exception as e:
        raise DistributedError(
            f"init_distributed: rank {rank} of {world_size} could not join the process group at "
            f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} ({backend}, timeout "
            f"{timeout:g}s): {e}. Check that every rank was started with the same rendezvous arguments"
        ) from e


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
    rank = _env_int("RANK", 0) or 0
    local_rank = _env_int("LOCAL_RANK", rank) or 0
    if world_size is None or world_size == 1:
        _INFO = DistInfo(0, 1, 0, None, torch.device(device) if device is not None else torch.device("cpu"), timeout)
        return _INFO
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"init_distributed: RANK={rank} is not in [0, WORLD_SIZE={world_size}); check the launcher")
    if not dist.is_available():
        raise RuntimeError("init_distributed: this torch build has no torch.distributed; install a standard wheel")
    backend_name, dev = _backend_and_device(backend, device, local_rank)
    _join(backend_name, dev, timeout, rank, world_size)
    _INFO = DistInfo(rank, world_size, local_rank, backend_name, dev, timeout)
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
