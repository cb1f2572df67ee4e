"""iMAML (Rajeswaran et al., 2019): the implicit meta-gradient of a proximally regularised inner problem."""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vjp

from metafunc._shared import check_choice, check_nonnegative, check_positive, check_steps
from metafunc.algorithms.base import (
    LossSpec,
    MetaLearner,
    check_model,
    make_learner,
    resolve_loss,
    task_metrics,
)
from metafunc.core.task_function import TaskFunction
from metafunc.core.tree import tree_detach, tree_straight_through
from metafunc.core.types import Metrics, ModelFn, Params, Task
from metafunc.gradients._common import attach_gradient, make_task_loss
from metafunc.gradients.solvers import conjugate_gradient

__all__ = ["imaml", "proximal_inner_loop", "INNER_SOLVERS"]

INNER_SOLVERS = ("sgd", "adam")
"""Optimisers :func:`imaml` can solve its inner problem with."""

def proximal_inner_loop(
    task_loss: Callable[[Params, Tensor, Tensor], Tensor],
    *,
    steps: int,
    lr: float,
    lam: float,
    solver: Literal["sgd", "adam"] = "sgd",
) -> Callable[[Params, Tensor, Tensor], tuple[Params, Tensor]]:
    """``solve(theta, x, y) -> (phi, support_losses)``: ``steps`` steps of SGD or Adam on the proximal problem
    ``min_phi task_loss(phi, x, y) + lam/2 ||phi - theta||^2`` from ``phi = theta``, without a graph.

    ``support_losses`` holds ``task_loss`` (without the proximal term) before each step.

    Example:
        >>> import torch.nn.functional as F
        >>> from metafunc import functionalize
        >>> model, params = functionalize(torch.nn.Linear(2, 1))
        >>> solve = proximal_inner_loop(lambda p, x, y: F.mse_loss(model(p, x), y), steps=5, lr=0.1, lam=1.0)
        >>> phi, losses = solve(params, torch.randn(8, 2), torch.randn(8, 1))
        >>> losses.shape
        torch.Size([5])
    """
    caller = "proximal_inner_loop"
    check_steps(caller, "steps", steps)
    check_positive(caller, "lr", lr)
    check_positive(caller, "lam", lam)
    check_choice(caller, "solver", solver, INNER_SOLVERS)
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def solve(theta: Params, x: Tensor, y: Tensor) -> tuple[Params, Tensor]:
        theta = tree_detach(theta)
        phi = dict(theta)
        m = {k: torch.zeros_like(v) for k, v in phi.items()}
        s = {k: torch.zeros_like(v) for k, v in phi.items()}
        losses = []
        for t in range(1, steps + 1):
            g, value = grad_and_value(task_loss)(phi, x, y)
            g = {k: g[k] + lam * (phi[k] - theta[k]) for k in phi}
            if solver == "sgd":
                phi = {k: phi[k] - lr * g[k] for k in phi}
            else:
                m = {k: beta1 * m[k] + (1 - beta1) * g[k] for k in phi}
                s = {k: beta2 * s[k] + (1 - beta2) * g[k] * g[k] for k in phi}
                c1, c2 = 1 - beta1 ** t, 1 - beta2 ** t
                phi = {k: phi[k] - lr * (m[k] / c1) / (torch.sqrt(s[k] / c2) + eps) for k in phi}
            losses.append(value.detach())
        return phi, torch.stack(losses)

    return solve


def imaml(
    model: ModelFn,
    *,
    inner_lr: float = 0.1,
    steps: int = 10,
    loss: LossSpec = "cross_entropy",
    lam: float = 1.0,
    cg_iterations: int = 5,
    damping: float = 0.0,
    solver: Literal["sgd", "adam"] = "sgd",
) -> MetaLearner:
    """Implicit MAML: the meta-gradient of the proximally regularised inner problem by implicit differentiation.

    The inner problem of a task is ``phi*(theta) = argmin_phi L_s(phi) + lam/2 ||phi - theta||^2``, approximated by
    ``steps`` steps of ``solver`` (SGD or Adam, learning rate ``inner_lr``) from ``phi = theta`` without a graph. At
    the optimum ``d phi*/d theta = (I + H_s(phi*)/lam)^-1``, so the meta-gradient ``g`` solves

        ``(I + H_s(phi)/lam + damping * I) g = grad L_q(phi)``

    with ``cg_iterations`` steps of :func:`conjugate_gradient`, using Hessian-vector products from
    ``torch.func.vjp`` of ``torch.func.grad`` (one linearisation per task, reused by every iteration). Memory does
    not grow with ``steps``. ``damping`` (>= 0) regularises the solve. The returned loss is the query loss at
    ``phi`` and carries ``g`` as its gradient, so :func:`metafunc.meta_value_and_grad`, :func:`metafunc.meta_batch`
    (vmap or loop) and ``torch.func.grad`` work as for any learner. All parameters are adapted.

    Example:
        >>> import torch
        >>> from metafunc import apply_grads, functionalize, meta_value_and_grad, models, sinusoid_tasks
        >>> model, params = functionalize(models.mlp())
        >>> learner = imaml(model, inner_lr=0.01, steps=20, loss="mse", lam=2.0, cg_iterations=5)
        >>> tasks = sinusoid_tasks(4, shots=10, generator=torch.Generator().manual_seed(0))
        >>> loss, metrics, grads = meta_value_and_grad(learner)(params, tasks)
        >>> apply_grads(params, grads)  # then optimizer.step()
    """
    name = "imaml"
    check_model(model, name)
    check_positive(name, "inner_lr", inner_lr)
    check_steps(name, "steps", steps)
    lam = check_positive(name, "lam", lam)
    check_steps(name, "cg_iterations", cg_iterations)
    damping = check_nonnegative(name, "damping", damping)
    check_choice(name, "solver", solver, INNER_SOLVERS)
    loss_fn, classification = resolve_loss(loss, name)
    task_loss = make_task_loss(model, loss_fn)
    solve = proximal_inner_loop(task_loss, steps=steps, lr=float(inner_lr), lam=lam, solver=solver)

    def adapt_fn(params: Params, x: Tensor, y: Tensor, *, steps: int | None = None, **_: object) -> tuple[Params, Tensor]:
        run = solve if steps is None else proximal_inner_loop(task_loss, steps=steps, lr=float(inner_lr), lam=lam,
                                                              solver=solver)
        phi, losses = run(params, x, y)
        return tree_straight_through(params, phi), losses

    learner = make_learner(name=name, model=model, adapt=adapt_fn, loss_fn=loss_fn, classification=classification,
                           second_order=True)

    def meta_loss(params: Params, task: Task) -> tuple[Tensor, Metrics]:
        x, y = task.support_x, task.support_y
        phi, support_losses = solve(params, x, y)

        def query(p: Params) -> tuple[Tensor, Tensor]:
            prediction = model(p, task.query_x)
            return loss_fn(prediction, task.query_y), prediction

        v, (query_loss, prediction) = grad_and_value(query, has_aux=True)(phi)
        _, hvp = vjp(lambda p: grad(task_loss)(p, x, y), phi)  # type: ignore[misc]

        def matvec(u: Params) -> Params:
            (hu,) = hvp(u)
            return {k: u[k] + hu[k] / lam for k in u}

        g = conjugate_gradient(matvec, v, iterations=cg_iterations, damping=damping)  # type: ignore[arg-type]
        metrics = task_metrics(prediction, task.query_y, query_loss, classification)
        metrics["support_loss"] = support_losses[0]
        return attach_gradient(params, query_loss, g), metrics  # type: ignore[arg-type]

    return learner._replace(meta_loss=TaskFunction(
        meta_loss, name=f"{name}_meta_loss", thread_safe=learner.meta_loss.thread_safe,
        validate=learner.meta_loss.validate))
