"""Linear solvers for implicit meta-gradients: conjugate gradient on parameter trees, matrix-free."""

from __future__ import annotations

from typing import Callable, NamedTuple, Union

import torch
from torch import Tensor

from metafunc._shared import check_nonnegative, check_steps
from metafunc.core.types import Params

__all__ = ["conjugate_gradient", "conjugate_gradient_solution", "CGSolution", "Tree"]

Tree = Union[Params, Tensor]
"""A parameter tree (dict of tensors) or a single tensor: what the solvers work on."""


class CGSolution(NamedTuple):
    """What :func:`conjugate_gradient_solution` returns.

    ``x`` is the approximate solution (the structure of ``b``). ``residuals`` (shape ``[iterations + 1]``) holds the
    relative residual ``||b - (A + damping I) x_i|| / ||b||`` before the first iteration and after each one (the
    recursively updated residual of CG, equal to the true one up to rounding; 0 for ``b = 0``). ``curvature`` (shape
    ``[iterations]``) holds ``p^T (A + damping I) p / p^T p`` along each search direction ``p``: a value <= 0 shows the
    matrix is not positive definite, where CG has no guarantee and may diverge.

    Example:
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> sol = conjugate_gradient_solution(lambda v: A @ v, torch.ones(2), iterations=2)
        >>> sol.residuals.shape, bool(sol.residual < 1e-6), bool((sol.curvature > 0).all())
        (torch.Size([3]), True, True)
    """

    x: Tree
    residuals: Tensor
    curvature: Tensor

    @property
    def residual(self) -> Tensor:
        """The relative residual after the last iteration, ``residuals[-1]``."""
        return self.residuals[-1]


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    # 0 / 0 -> 0 once the residual vanishes (exact convergence); no data-dependent branch, so vmap-safe.
    return a / torch.where(b == 0, torch.ones_like(b), b)


def _dot(a: Params, c: Params) -> Tensor:
    return sum((a[k] * c[k]).sum() for k in a)  # type: ignore[return-value]


def conjugate_gradient_solution(
    matvec: Callable[[Tree], Tree],
    b: Tree,
    *,
    iterations: int = 10,
    damping: float = 0.0,
    x0: Tree | None = None,
) -> CGSolution:
    """Solve ``(A + damping * I) x = b`` like :func:`conjugate_gradient`, and report how well it was solved.

    Returns a :class:`CGSolution`: the solution ``x``, the relative residual before and after each iteration and the
    curvature ``p^T A p / p^T p`` along each search direction. On a symmetric positive-definite ``A`` the residual
    reaches 0 (up to rounding) after ``n`` iterations on an ``n``-dimensional problem; a residual that grows, with
    a curvature <= 0, means ``A + damping * I`` is not positive definite: raise ``damping``.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> sol = conjugate_gradient_solution(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64),
        ...                                   iterations=2)
        >>> sol.residuals[0].item(), sol.residual.item() < 1e-12
        (1.0, True)
    """
    if not callable(matvec):
        raise TypeError(f"conjugate_gradient: matvec must be callable as matvec(v) -> A v (got {type(matvec).__name__})")
    check_steps("conjugate_gradient", "iterations", iterations)
    damping = check_nonnegative("conjugate_gradient", "damping", damping)
    is_tensor = isinstance(b, Tensor)
    if not is_tensor and not (isinstance(b, dict) and all(isinstance(v, Tensor) for v in b.values())):
        raise TypeError(f"conjugate_gradient: b must be a tensor or a dict of tensors (got {type(b).__name__})")
    wrap = (lambda t: {"x": t}) if is_tensor else (lambda t: t)
    unwrap = (lambda t: t["x"]) if is_tensor else (lambda t: t)
    bt: Params = wrap(b)  # type: ignore[arg-type]

    def apply(v: Params) -> Params:
        out: Params = wrap(matvec(unwrap(v)))  # type: ignore[arg-type]
        if out.keys() != v.keys():
            raise ValueError(f"conjugate_gradient: matvec returned keys {sorted(out)} for an input with keys {sorted(v)}")
        return {k: out[k] + damping * v[k] for k in v} if damping else out

    if x0 is None:
        x = {k: torch.zeros_like(v) for k, v in bt.items()}
        r = dict(bt)
    else:
        x = wrap(x0)  # type: ignore[arg-type]
        ax = apply(x)
        r = {k: bt[k] - ax[k] for k in bt}
    b_norm = _dot(bt, bt).sqrt()
    p = dict(r)
    rr = _dot(r, r)
    residuals, curvature = [_safe_div(rr.sqrt(), b_norm)], []
    for _ in range(iterations):
        ap = apply(p)
        pap = _dot(p, ap)
        curvature.append(_safe_div(pap, _dot(p, p)))
        alpha = _safe_div(rr, pap)
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_new = _dot(r, r)
        residuals.append(_safe_div(rr_new.sqrt(), b_norm))
        beta = _safe_div(rr_new, rr)
        p = {k: r[k] + beta * p[k] for k in p}
        rr = rr_new
    return CGSolution(unwrap(x), torch.stack(residuals), torch.stack(curvature))


def conjugate_gradient(
    matvec: Callable[[Tree], Tree],
    b: Tree,
    *,
    iterations: int = 10,
    damping: float = 0.0,
    x0: Tree | None = None,
) -> Tree:
    """Solve ``(A + damping * I) x = b`` for a symmetric positive-definite ``A`` given only ``matvec(v) = A v``.

    ``b`` is a tensor or a dict of tensors (a parameter tree); ``matvec`` takes and returns the same structure.
    Exactly ``iterations`` conjugate-gradient steps run (no data-dependent early exit, so it works under ``vmap``);
    on an ``n``-dimensional problem ``n`` iterations solve it up to rounding. ``x0`` is the starting point (zeros
    by default). :func:`conjugate_gradient_solution` runs the same iterations and also returns the residuals.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> x = conjugate_gradient(lambda v: A @ v, b, iterations=2)
        >>> torch.allclose(A @ x, b)
        True
    """
    return conjugate_gradient_solution(matvec, b, iterations=iterations, damping=damping, x0=x0).x
