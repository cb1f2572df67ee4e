"""Synthetic few-shot classification: Gaussian clusters in feature space, a fast stand-in for image data."""

from __future__ import annotations

import torch
from torch import Tensor

from metafunc._shared import check_positive, check_steps
from metafunc.core.types import Task

__all__ = ["GaussianClassification"]


class GaussianClassification:
    """Synthetic ``ways``-way tasks: each task draws class centres ``N(0, spread^2 I)`` in ``dim`` dimensions and
    examples ``centre + N(0, I)``; labels ``0..ways-1`` in a random order. A fast stand-in for image data.

    Example:
        >>> task = GaussianClassification(ways=3, shots=2, queries=4).sample(5, torch.Generator().manual_seed(0))
        >>> task.support_x.shape, task.query_y.shape
        (torch.Size([5, 6, 8]), torch.Size([5, 12]))
    """

    def __init__(self, ways: int, shots: int, queries: int, dim: int = 8, spread: float = 2.0,
                 dtype: torch.dtype = torch.float32):
        self.ways = check_steps("GaussianClassification", "ways", ways)
        self.shots = check_steps("GaussianClassification", "shots", shots)
        self.queries = check_steps("GaussianClassification", "queries", queries)
        self.dim = check_steps("GaussianClassification", "dim", dim)
        self.spread = check_positive("GaussianClassification", "spread", spread)
        self.dtype = dtype

    def sample(self, meta_batch: int, generator: torch.Generator) -> Task:
        """``meta_batch`` tasks drawn with ``generator``."""
        check_steps("GaussianClassification.sample", "meta_batch", meta_batch)
        dev = generator.device
        centres = self.spread * torch.randn(meta_batch, self.ways, 1, self.dim, generator=generator, device=dev,
                                            dtype=self.dtype)
        n = self.shots + self.queries
        x = centres + torch.randn(meta_batch, self.ways, n, self.dim, generator=generator, device=dev,
                                  dtype=self.dtype)
        y = torch.arange(self.ways, device=dev).view(1, self.ways, 1).expand(meta_batch, self.ways, n)

        def split(lo: int, hi: int) -> tuple[Tensor, Tensor]:
            xs = x[:, :, lo:hi].reshape(meta_batch, -1, self.dim)
            ys = y[:, :, lo:hi].reshape(meta_batch, -1)
            order = torch.argsort(torch.rand(ys.shape, generator=generator, device=dev), dim=1)
            return torch.gather(xs, 1, order.unsqueeze(-1).expand_as(xs)), torch.gather(ys, 1, order)

        sx, sy = split(0, self.shots)
        qx, qy = split(self.shots, n)
        return Task(sx, sy, qx, qy)
