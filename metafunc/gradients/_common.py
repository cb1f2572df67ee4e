"""Pieces shared by the gradient paths: the task loss, the inner SGD step and the gradient surrogate."""

from __future__ import annotations

from typing import Callable, cast

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

from metafunc.core.types import Params

__all__ = ["TaskLoss", "HVP_MODES", "make_task_loss", "make_step", "make_step_pullback", "attach_gradient", "clip_tree"]

HVP_MODES = ("forward", "reverse")
"""How a path computes the Hessian-vector products of an inner step: forward-over-reverse or reverse-over-reverse."""

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


def make_step_pullback(task_loss: TaskLoss, names: list[str], lr: float,
                       hvp: str = "reverse") -> Callable[[Params, Params, Tensor, Tensor], Params]:
    """The vector-Jacobian product of one inner SGD step: ``pullback(phi, v, x, y) = v - lr * H(phi) v_names``.

    ``H`` is the Hessian of ``task_loss`` over the whole tree and ``v_names`` is ``v`` with zeros outside ``names``,
    so the adapted parameters get ``v - lr * H_aa v_a`` and the fixed ones their mixed terms ``- lr * H_fa v_a``:
    exactly what ``torch.func.vjp`` of :func:`make_step` gives, by the symmetry of the Hessian.

    ``hvp="reverse"`` differentiates the step by reverse mode (``vjp`` of the step, which keeps the graph of the
    backward pass for a second backward). ``hvp="forward"`` computes ``H v`` forward-over-reverse (``jvp`` of
    ``grad``): the tangents ride along one gradient computation and no graph of the backward pass is kept. A
    floating-point target ``y`` enters the ``jvp`` as a primal with a materialised zero tangent: left out, its tangent
    is torch's immutable efficient zero, which ``F.mse_loss``'s forward-AD formula divides in place ("ZeroTensors are
    immutable", pytorch/pytorch#123996); a zero tangent adds exact zeros, so ``H v`` is unchanged.
    """
    if hvp == "reverse":
        step = make_step(task_loss, names, lr)

        def reverse(phi: Params, v: Params, x: Tensor, y: Tensor) -> Params:
            _, pull = vjp(lambda p: step(p, x, y), phi)  # type: ignore[misc]
            return cast(Params, pull(v)[0])

        return reverse

    def forward(phi: Params, v: Params, x: Tensor, y: Tensor) -> Params:
        tangent = {k: (v[k] if k in names else torch.zeros_like(t)) for k, t in phi.items()}
        if y.is_floating_point():  # see the docstring: a real zero tangent for the target (pytorch#123996)
            hv = jvp(lambda p, t: grad(task_loss)(p, x, t), (phi, y), (tangent, torch.zeros_like(y)))[1]
        else:
            hv = jvp(lambda p: grad(task_loss)(p, x, y), (phi,), (tangent,))[1]
        return {k: v[k] - lr * hv[k] for k in phi}

    return forward


def attach_gradient(params: Params, value: Tensor, gradient: Params) -> Tensor:
    """A scalar equal to ``value`` whose gradient with respect to ``params`` is ``gradient``.

    ``value.detach() + (<params, stopgrad(gradient)> - stopgrad(<params, stopgrad(gradient)>))``: the bracket is
    exactly zero, and its derivative is ``gradient``. This lets a path that computes its meta-gradient itself (by
    vector-Jacobian products or a linear solve) return a loss that the meta-steps (``meta_value_and_grad``),
    ``meta_batch`` (vmap and loop) and ``torch.func.grad`` differentiate like any other learner's.
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
