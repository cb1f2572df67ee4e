"""Pieces shared by the gradient paths: the task loss, the inner SGD step and the gradient surrogate."""

from __future__ import annotations

from typing import Callable, cast

import torch
from torch import Tensor
from torch.func import grad

from metafunc.core.types import Params

__all__ = ["TaskLoss", "make_task_loss", "make_step", "attach_gradient", "clip_tree"]

TaskLoss = Callable[[Params, Tensor, Tensor], Tensor]


def make_task_loss(model: Callable[[Params, Tensor], Tensor], loss_fn: Callable[[Tensor, Tensor], Tensor]) -> TaskLoss:
    """``task_loss(params, x, y) = loss_fn(model(params, x), y)``."""

    def task_loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(model(params, x), y)

    return task_loss


def make_step(task_loss: TaskLoss, names: list[str], lr: float) -> Callable[[Params, Tensor, Tensor], Params]:
    """One inner SGD step ``phi -> phi - lr * grad_names task_loss(phi)``; the other parameters pass through.

    The step is a pure function of the whole tree, so ``torch.func.vjp`` of it gives the vector-Jacobian product of
    one step with respect to every parameter (the adapted ones and the fixed ones they interact with).
    """

    def step(phi: Params, x: Tensor, y: Tensor) -> Params:
        def loss_of(adapted: Params) -> Tensor:
            return task_loss({**phi, **adapted}, x, y)

        g = grad(loss_of)({k: phi[k] for k in names})
        return {**phi, **{k: phi[k] - lr * g[k] for k in names}}

    return step


def attach_gradient(params: Params, value: Tensor, gradient: Params) -> Tensor:
    """A scalar equal to ``value`` whose gradient with respect to ``params`` is ``gradient``.

    ``value.detach() + (<params, stopgrad(gradient)> - stopgrad(<params, stopgrad(gradient)>))``: the bracket is
    exactly zero, and its derivative is ``gradient``. This lets a path that computes its meta-gradient itself (by
    vector-Jacobian products or a linear solve) return a loss that ``loss.backward()``, ``meta_batch`` (vmap and
    loop) and ``torch.func.grad`` differentiate like any other learner's.
    """
    dot = cast(Tensor, sum((params[k] * gradient[k].detach()).sum() for k in gradient))
    return value.detach() + (dot - dot.detach())


def clip_tree(tree: Params, max_norm: float | None) -> Params:
    """Scale ``tree`` so that its global norm is at most ``max_norm`` (no data-dependent Python branch: vmap-safe)."""
    if max_norm is None:
        return tree
    norm = torch.sqrt(sum((v * v).sum() for v in tree.values()))  # type: ignore[arg-type]
    scale = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
    return {k: v * scale for k, v in tree.items()}
