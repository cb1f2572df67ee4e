"""iMAML (Rajeswaran et al., 2019): the implicit meta-gradient of a proximally regularised inner problem."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Literal

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
from metafunc.gradients.solvers import CGSolution, conjugate_gradient_solution

__all__ = ["imaml", "proximal_inner_loop", "INNER_SOLVERS", "INNER_LOOPS", "CG_DIVERGENCE_ACTIONS",
           "CGDivergenceWarning"]

INNER_SOLVERS = ("sgd", "adam")
"""Optimisers :func:`imaml` can solve its inner problem with."""

INNER_LOOPS = ("pull_back", "proximal")
"""How :func:`imaml`'s inner loop meets the proximal term: ``"proximal"`` (the paper) takes every step on
``L_s + lam/2 ||phi - theta||^2``; ``"pull_back"`` (the authors' code) takes the steps on ``L_s`` alone, then one step
on the proximal term alone, ``phi <- phi - inner_lr * lam * (phi - theta)``."""

CG_DIVERGENCE_ACTIONS = ("warn", "raise", "ignore")
"""What :func:`imaml` does when conjugate gradient diverges on a task: its residual ends above where it started
after a search direction of non-positive curvature (the matrix is not positive definite)."""


class CGDivergenceWarning(RuntimeWarning):
    """Conjugate gradient diverged in :func:`imaml`: its meta-gradient may point the wrong way.

    Example:
        >>> issubclass(CGDivergenceWarning, RuntimeWarning)
        True
    """


def proximal_inner_loop(
    task_loss: Callable[[Params, Tensor, Tensor], Tensor],
    *,
    steps: int,
    lr: float,
    lam: float,
    solver: Literal["sgd", "adam"] = "sgd",
    inner_loop: Literal["pull_back", "proximal"] = "proximal",
) -> Callable[[Params, Tensor, Tensor], tuple[Params, Tensor]]:
    """``solve(theta, x, y) -> (phi, support_losses)``: ``steps`` steps of SGD or Adam on the proximal problem
    ``min_phi task_loss(phi, x, y) + lam/2 ||phi - theta||^2`` from ``phi = theta``, without a graph.

    ``inner_loop="pull_back"`` (the iMAML authors' code) takes the ``steps`` steps on ``task_loss`` alone, then one
    SGD step on the proximal term alone, ``phi <- phi - lr * lam * (phi - theta)`` (so ``lr * lam`` must be <= 1).
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
    _check_inner("proximal_inner_loop", steps=steps, lr=lr, lam=lam, solver=solver, inner_loop=inner_loop)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    pull = lam if inner_loop == "proximal" else 0.0

    def solve(theta: Params, x: Tensor, y: Tensor) -> tuple[Params, Tensor]:
        theta = tree_detach(theta)
        phi = dict(theta)
        m = {k: torch.zeros_like(v) for k, v in phi.items()}
        s = {k: torch.zeros_like(v) for k, v in phi.items()}
        losses = []
        for t in range(1, steps + 1):
            g, value = grad_and_value(task_loss)(phi, x, y)
            if pull:
                g = {k: g[k] + pull * (phi[k] - theta[k]) for k in phi}
            if solver == "sgd":
                phi = {k: phi[k] - lr * g[k] for k in phi}
            else:
                m = {k: beta1 * m[k] + (1 - beta1) * g[k] for k in phi}
                s = {k: beta2 * s[k] + (1 - beta2) * g[k] * g[k] for k in phi}
                c1, c2 = 1 - beta1 ** t, 1 - beta2 ** t
                phi = {k: phi[k] - lr * (m[k] / c1) / (torch.sqrt(s[k] / c2) + eps) for k in phi}
            losses.append(value.detach())
        if inner_loop == "pull_back":
            phi = {k: phi[k] - lr * lam * (phi[k] - theta[k]) for k in phi}
        return phi, torch.stack(losses)

    return solve


def _check_inner(caller: str, *, steps: int, lr: float, lam: float, solver: str, inner_loop: str) -> None:
    check_steps(caller, "steps", steps)
    check_positive(caller, "lr" if caller == "proximal_inner_loop" else "inner_lr", lr)
    check_positive(caller, "lam", lam)
    check_choice(caller, "solver", solver, INNER_SOLVERS)
    check_choice(caller, "inner_loop", inner_loop, INNER_LOOPS)
    if inner_loop == "pull_back" and lr * lam > 1:
        lr_name = "lr" if caller == "proximal_inner_loop" else "inner_lr"
        raise ValueError(f"{caller}: inner_loop='pull_back' needs {lr_name} * lam <= 1 (got {lr_name} * lam = "
                         f"{lr} * {lam} = {lr * lam:g}: its last step would move phi past theta); lower lam to at "
                         f"most {1 / lr:g}, or use inner_loop='proximal'")


class _CheckCG(torch.autograd.Function):
    """The identity on ``residuals`` that first runs ``report(residuals, curvature)`` on concrete tensors, also under
    ``vmap`` (its vmap rule unbatches them), so a data-dependent check can look at every task's solve."""

    @staticmethod
    def forward(residuals: Tensor, curvature: Tensor, report: Callable[[Tensor, Tensor], None]) -> Tensor:
        report(residuals.detach(), curvature.detach())
        return residuals.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return grad_output, None, None

    @staticmethod
    def vmap(info: Any, in_dims: Any, residuals: Tensor, curvature: Tensor,
             report: Callable[[Tensor, Tensor], None]) -> tuple[Tensor, int | None]:
        r_dim, c_dim = in_dims[0], in_dims[1]
        residuals = residuals if r_dim is None else residuals.movedim(r_dim, 0)
        curvature = curvature if c_dim is None else curvature.movedim(c_dim, 0)
        return _CheckCG.apply(residuals, curvature, report), (None if r_dim is None else 0)


def _divergence_report(action: str, damping: float, lam: float, lam_damping: float,
                       cg_iterations: int) -> Callable[[Tensor, Tensor], None]:
    """``report(residuals, curvature)``: warn (once) or raise when some task's CG residual ended above its start
    after meeting a direction of non-positive curvature."""
    warned = [False]

    def report(residuals: Tensor, curvature: Tensor) -> None:
        final, start = residuals[..., -1], residuals[..., 0]
        # On a positive-definite matrix a residual may rise for a while (CG minimises the A-norm of the error, and
        # its iterate keeps a positive inner product with grad L_q); with negative curvature nothing is guaranteed.
        diverged = (final > start) & (curvature.min(-1).values <= 0)
        if not bool(diverged.any()) or (action == "warn" and warned[0]):
            return
        message = (f"imaml: conjugate gradient diverged on {int(diverged.sum())} of {diverged.numel()} task(s): the "
                   f"residual of (1 + damping) g + H g / (lam + lam_damping) = grad L_q, with damping={damping:g}, "
                   f"lam={lam:g}, lam_damping={lam_damping:g}, grew from {float(start.max()):.3g} to "
                   f"{float(final[diverged].max()):.3g} (relative to ||grad L_q||) in {cg_iterations} iterations and "
                   f"met negative curvature (p^T A p / p^T p = {float(curvature.min()):.3g}): the matrix is not "
                   f"positive definite on this non-convex loss, and the meta-gradient may point the wrong way. Raise "
                   f"damping (the authors' code uses damping=1) or lam_damping (their 10), or lam; the metric "
                   f"'cg_residual' shows the residual every step")
        if action == "raise":
            raise RuntimeError(message + " (or pass on_cg_divergence='warn' to train on)")
        warned[0] = True
        warnings.warn(message + " (warned once per learner)", CGDivergenceWarning, stacklevel=2)

    return report


def imaml(
    model: ModelFn,
    *,
    inner_lr: float = 0.1,
    steps: int = 10,
    loss: LossSpec = "cross_entropy",
    lam: float = 1.0,
    cg_iterations: int = 5,
    damping: float = 1.0,
    solver: Literal["sgd", "adam"] = "sgd",
    lam_damping: float = 10.0,
    inner_loop: Literal["pull_back", "proximal"] = "pull_back",
    on_cg_divergence: Literal["warn", "raise", "ignore"] = "warn",
) -> MetaLearner:
    """Implicit MAML: the meta-gradient of the proximally regularised inner problem by implicit differentiation.

    The inner problem of a task is ``phi*(theta) = argmin_phi L_s(phi) + lam/2 ||phi - theta||^2``, approximated by
    ``steps`` steps of ``solver`` (SGD or Adam, learning rate ``inner_lr``) from ``phi = theta`` without a graph:
    every step on the whole objective (``inner_loop="proximal"``, the paper), or on ``L_s`` alone followed by one
    step on the proximal term alone, ``phi <- phi - inner_lr * lam * (phi - theta)`` (``"pull_back"``, the authors'
    code). The meta-gradient ``g`` solves

        ``(1 + damping) g + H_s(phi) g / (lam + lam_damping) = grad L_q(phi)``

    with ``cg_iterations`` steps of :func:`conjugate_gradient_solution`, using Hessian-vector products from
    ``torch.func.vjp`` of ``torch.func.grad`` (one linearisation per task, reused by every iteration). Memory does
    not grow with ``steps``. ``damping=0, lam_damping=0, inner_loop="proximal"`` is the paper's system
    ``(I + H/lam) g = grad L_q``; the defaults ``damping=1, lam_damping=10, inner_loop="pull_back"`` are the authors'
    (github.com/aravindr93/imaml_dev), which trains: ``I + H/lam`` is not positive definite on a non-convex loss
    and a few CG iterations on it can turn the meta-gradient around.

    Each task reports ``cg_residual``, the relative residual ``||A g - grad L_q|| / ||grad L_q||`` the solve ended
    at; when it ends above 1 after a search direction of non-positive curvature (CG diverged: the matrix is not
    positive definite), ``on_cg_divergence`` warns once (:class:`CGDivergenceWarning`), raises a
    ``RuntimeError``, or is ignored (no device sync). The returned loss is the query loss at ``phi`` and carries
    ``g`` as its gradient, so :func:`metafunc.meta_value_and_grad`, :func:`metafunc.meta_batch` (vmap or loop) and
    ``torch.func.grad`` work as for any learner. All parameters are adapted.

    Example:
        >>> import torch
        >>> from metafunc import apply_grads, functionalize, meta_value_and_grad, models, sinusoid_tasks
        >>> model, params = functionalize(models.mlp())
        >>> learner = imaml(model, inner_lr=0.01, steps=20, loss="mse", lam=2.0, cg_iterations=5)
        >>> tasks = sinusoid_tasks(4, shots=10, generator=torch.Generator().manual_seed(0))
        >>> loss, metrics, grads = meta_value_and_grad(learner)(params, tasks)
        >>> apply_grads(params, grads)  # then optimizer.step()
        >>> sorted(metrics)
        ['cg_residual', 'loss', 'support_loss']
        >>> paper = imaml(model, inner_lr=0.01, steps=20, loss="mse", lam=2.0, damping=0.0, lam_damping=0.0,
        ...               inner_loop="proximal")
    """
    name = "imaml"
    check_model(model, name)
    check_positive(name, "inner_lr", inner_lr)
    lam = check_positive(name, "lam", lam)
    _check_inner(name, steps=steps, lr=inner_lr, lam=lam, solver=solver, inner_loop=inner_loop)
    check_steps(name, "cg_iterations", cg_iterations)
    damping = check_nonnegative(name, "damping", damping)
    lam_damping = check_nonnegative(name, "lam_damping", lam_damping)
    check_choice(name, "on_cg_divergence", on_cg_divergence, CG_DIVERGENCE_ACTIONS)
    loss_fn, classification = resolve_loss(loss, name)
    task_loss = make_task_loss(model, loss_fn)

    def inner(n_steps: int) -> Callable[[Params, Tensor, Tensor], tuple[Params, Tensor]]:
        return proximal_inner_loop(task_loss, steps=n_steps, lr=float(inner_lr), lam=lam, solver=solver,
                                   inner_loop=inner_loop)

    solve = inner(steps)

    def adapt_fn(params: Params, x: Tensor, y: Tensor, *, steps: int | None = None, **_: object) -> tuple[Params, Tensor]:
        phi, losses = (solve if steps is None else inner(steps))(params, x, y)
        return tree_straight_through(params, phi), losses

    learner = make_learner(name=name, model=model, adapt=adapt_fn, loss_fn=loss_fn, classification=classification,
                           second_order=True)
    report = _divergence_report(on_cg_divergence, damping, lam, lam_damping, cg_iterations)
    scale = 1.0 / (lam + lam_damping)

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
            return {k: u[k] + scale * hu[k] for k in u}

        sol: CGSolution = conjugate_gradient_solution(matvec, v, iterations=cg_iterations,  # type: ignore[arg-type]
                                                      damping=damping)
        residuals = sol.residuals if on_cg_divergence == "ignore" else _CheckCG.apply(sol.residuals, sol.curvature,
                                                                                      report)
        metrics = task_metrics(prediction, task.query_y, query_loss, classification)
        metrics["support_loss"] = support_losses[0]
        metrics["cg_residual"] = residuals[-1]
        return attach_gradient(params, query_loss, sol.x), metrics  # type: ignore[arg-type]

    return learner._replace(meta_loss=TaskFunction(
        meta_loss, name=f"{name}_meta_loss", thread_safe=learner.meta_loss.thread_safe,
        validate=learner.meta_loss.validate))
