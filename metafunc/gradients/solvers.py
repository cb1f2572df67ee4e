"""Linear solvers for implicit meta-gradients: conjugate gradient on parameter trees, matrix-free."""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

from metafunc._shared import check_nonnegative, check_steps
from metafunc.core.types import Params

__all__ = ["conjugate_gradient", "Tree"]

Tree = Union[Params, Tensor]
"""A parameter tree (dict of tensors) or a single tensor: what the solvers work on."""


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    # 0 / 0 -> 0 once the residual vanishes (exact convergence); no data-dependent branch, so vmap-safe.
    return a / torch.where(b == 0, torch.ones_like(b), b)


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
    by default).

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> x = conjugate_gradient(lambda v: A @ v, b, iterations=2)
        >>> torch.allclose(A @ x, b)
        True
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

    def dot(a: Params, c: Params) -> Tensor:
        return sum((a[k] * c[k]).sum() for k in a)  # type: ignore[return-value]

    if x0 is None:
        x = {k: torch.zeros_like(v) for k, v in bt.items()}
        r = dict(bt)
    else:
        x = wrap(x0)  # type: ignore[arg-type]
        ax = apply(x)
        r = {k: bt[k] - ax[k] for k in bt}
    p = dict(r)
    rr = dot(r, r)
    for _ in range(iterations):
        ap = apply(p)
        alpha = _safe_div(rr, dot(p, ap))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_new = dot(r, r)
        beta = _safe_div(rr_new, rr)
        p = {k: r[k] + beta * p[k] for k in p}
        rr = rr_new
    return unwrap(x)
