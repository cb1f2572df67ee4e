"""Helpers shared by the peer implementations."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["grads_of", "zero_grads", "squared_distances", "class_means"]


def zero_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def grads_of(module: nn.Module) -> dict[str, Tensor]:
    return {k: (torch.zeros_like(p) if p.grad is None else p.grad) for k, p in module.named_parameters()}


def squared_distances(q: Tensor, c: Tensor) -> Tensor:
    diff = q.unsqueeze(-2) - c.unsqueeze(-3)
    return (diff * diff).sum(-1)


def class_means(z: Tensor, y: Tensor, ways: int) -> Tensor:
    onehot = torch.nn.functional.one_hot(y, ways).to(z.dtype)
    return onehot.t() @ z / onehot.sum(0).unsqueeze(1)
