"""Sinusoid regression tasks of the MAML paper: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from metafunc._shared import check_steps
from metafunc.core.types import Task

__all__ = ["sinusoid_tasks", "SinusoidTasks", "AMPLITUDE_RANGE", "PHASE_RANGE", "INPUT_RANGE"]

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


class SinusoidTasks(NamedTuple):
    """A meta-batch of sinusoid tasks with the amplitudes and phases that generated them.

    Example:
        >>> sampled = sinusoid_tasks(3, shots=5, generator=torch.Generator().manual_seed(0), return_parameters=True)
        >>> sampled.task.support_x.shape, sampled.amplitude.shape
        (torch.Size([3, 5, 1]), torch.Size([3]))
    """

    task: Task
    amplitude: Tensor
    phase: Tensor


def _uniform(shape: tuple[int, ...], lo: float, hi: float, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=dtype, device=generator.device)


def sinusoid_tasks(
    num_tasks: int,
    *,
    shots: int = 10,
    queries: int | None = None,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    return_parameters: bool = False,
) -> Task | SinusoidTasks:
    """Sample ``num_tasks`` sinusoid tasks with ``shots`` support and ``queries`` (default ``shots``) query points.

    Tensors have shape ``(num_tasks, points, 1)`` on the generator's device; the same generator state gives the same
    tasks. ``return_parameters=True`` also returns each task's amplitude and phase.

    Example:
        >>> tasks = sinusoid_tasks(3, shots=5, generator=torch.Generator().manual_seed(0))
        >>> tasks.support_x.shape, tasks.query_y.shape
        (torch.Size([3, 5, 1]), torch.Size([3, 5, 1]))
    """
    check_steps("sinusoid_tasks", "num_tasks", num_tasks)
    check_steps("sinusoid_tasks", "shots", shots)
    queries = shots if queries is None else check_steps("sinusoid_tasks", "queries", queries)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "sinusoid_tasks: generator must be a torch.Generator, e.g. torch.Generator().manual_seed(0) "
            f"(got {type(generator).__name__})"
        )
    amplitude = _uniform((num_tasks, 1, 1), *AMPLITUDE_RANGE, generator, dtype)
    phase = _uniform((num_tasks, 1, 1), *PHASE_RANGE, generator, dtype)
    x = _uniform((num_tasks, shots + queries, 1), *INPUT_RANGE, generator, dtype)
    y = amplitude * torch.sin(x - phase)
    task = Task(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])
    if return_parameters:
        return SinusoidTasks(task, amplitude.reshape(-1), phase.reshape(-1))
    return task


class SinusoidSource:
    """Sinusoid regression tasks (MAML paper) as a task source: ``sample(meta_batch, generator) -> Task``.

    Example:
        >>> SinusoidSource(shots=5, queries=20).sample(3, torch.Generator().manual_seed(0)).query_x.shape
        torch.Size([3, 20, 1])
    """

    def __init__(self, shots: int = 10, queries: int | None = None, dtype: torch.dtype = torch.float32):
        self.shots = check_steps("SinusoidSource", "shots", shots)
        self.queries = shots if queries is None else check_steps("SinusoidSource", "queries", queries)
        self.dtype = dtype

    def sample(self, meta_batch: int, generator: torch.Generator) -> Task:
        """``meta_batch`` tasks drawn with ``generator`` (on the generator's device)."""
        return sinusoid_tasks(meta_batch, shots=self.shots, queries=self.queries, generator=generator,
                              dtype=self.dtype)  # type: ignore[return-value]
