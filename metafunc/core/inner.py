"""The inner loop as a function transform: k differentiable SGD steps built on :func:`torch.func.grad`."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Mapping

import torch
from torch import Tensor
from torch.func import grad_and_value

from metafunc._shared import check_positive, check_steps, under_func_transform
from metafunc.core.tree import select, tree_straight_through
from metafunc.core.types import AdaptFn, Params, Selector

__all__ = ["inner_loop", "first_order", "sgd_step"]


def sgd_step(params: Params, grads: Params, lr: float | Mapping[str, float | Tensor]) -> Params:
    """One SGD step on the keys of ``grads``; ``lr`` is a scalar or a per-parameter dict (Meta-SGD).

    Example:
        >>> sgd_step({"w": torch.ones(2)}, {"w": torch.ones(2)}, 0.5)
        {'w': tensor([0.5000, 0.5000])}
    """
    if isinstance(lr, Mapping):
        return {**params, **{k: params[k] - lr[k] * g for k, g in grads.items()}}
    return {**params, **{k: params[k] - lr * g for k, g in grads.items()}}


def _twice_differentiable_attention(enabled: bool) -> contextlib.AbstractContextManager:
    """Make ``scaled_dot_product_attention`` use its math kernel while a second-order inner loop runs.

    The fused CPU/flash attention kernels have no double backward ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); the math kernel computes the
    same values with ops that differentiate twice. Models without attention are unaffected.
    """
    if not enabled:
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _sgd_steps(task_loss: Callable[[Params, Tensor, Tensor], Tensor], fast: Params, names: list[str], n: int,
               step_lr: float | Mapping[str, float | Tensor], x: Tensor, y: Tensor, losses: list[Tensor], *,
               first_order: bool) -> Params:
    """``n`` SGD steps of ``task_loss`` on the parameters ``names``, appending each step's loss to ``losses``:
    with :func:`torch.func.grad` under a ``torch.func`` transform, with ``torch.autograd.grad`` otherwise."""
    if not under_func_transform():
        return _autograd_steps(task_loss, fast, names, n, step_lr, x, y, losses, first_order=first_order)
    for _ in range(n):
        def loss_of_adapted(adapted: Params) -> Tensor:
            return task_loss({**fast, **adapted}, x, y)

        grads, loss = grad_and_value(loss_of_adapted)({k: fast[k] for k in names})
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        fast = sgd_step(fast, grads, step_lr)
        losses.append(loss.detach())
    return fast


def _autograd_steps(task_loss: Callable[[Params, Tensor, Tensor], Tensor], fast: Params, names: list[str], n: int,
                    step_lr: float | Mapping[str, float | Tensor], x: Tensor, y: Tensor, losses: list[Tensor], *,
                    first_order: bool) -> Params:
    """The loop fast path (no torch.func transform is running, e.g. ``meta_batch(mode="loop")``): the same steps
    with ``torch.autograd.grad``, which skips functorch's per-op wrapping.

    The graph is kept (``create_graph``) only when grad mode is on, the loop is second order and some adapted tensor
    is differentiated from outside, which is exactly when ``torch.func.grad``'s result would carry a graph. Values and
    gradients are the same as those of the ``torch.func`` path (tests/test_fast_paths.py checks both against a
    float64 autograd reference).
    """
    outer = torch.is_grad_enabled() and not first_order and (x.requires_grad or y.requires_grad)
    for _ in range(n):
        sub = [fast[k] for k in names]
        create = torch.is_grad_enabled() and not first_order and (
            outer or any(v.requires_grad for v in fast.values()))
        inputs = [v if v.requires_grad else v.detach().requires_grad_() for v in sub]
        with torch.enable_grad():
            loss = task_loss({**fast, **dict(zip(names, inputs))}, x, y)
            found = torch.autograd.grad(loss, inputs, create_graph=create, allow_unused=True)
        grads = {k: torch.zeros_like(v) if g is None else g for k, v, g in zip(names, sub, found)}
        if not create:
            grads = {k: g.detach() for k, g in grads.items()}
        fast = sgd_step(fast, grads, step_lr)
        losses.append(loss.detach())
    return fast


def inner_loop(
    task_loss: Callable[[Params, Tensor, Tensor], Tensor],
    *,
    steps: int,
    lr: float | None = None,
    first_order: bool = False,
    adapt: Selector = None,
) -> AdaptFn:
    """Build ``adapt(params, x, y, *, lr=None, steps=None) -> (adapted_params, support_losses)``.

    Each step is ``phi <- phi - lr * grad task_loss(phi, x, y)`` on the parameters chosen by ``adapt`` (all by
    default; ``"head"`` for ANIL, a predicate on names for BOIL). Gradients are those of :func:`torch.func.grad`, so
    differentiating the result differentiates through the loop (second order); ``first_order=True`` stops the
    gradient of each inner gradient (first-order MAML). ``lr`` is a scalar fixed here, or a dict of per-parameter
    learning-rate tensors passed at call time (Meta-SGD). ``support_losses`` has one entry per step, taken before
    that step's update.

    Example:
        >>> import torch.nn.functional as F
        >>> from metafunc import functionalize
        >>> model, params = functionalize(torch.nn.Linear(1, 1))
        >>> adapt = inner_loop(lambda p, x, y: F.mse_loss(model(p, x), y), steps=3, lr=0.1)
        >>> fast, losses = adapt(params, torch.randn(10, 1), torch.randn(10, 1))
        >>> losses.shape
        torch.Size([3])
    """
    if not callable(task_loss):
        raise TypeError(f"inner_loop: task_loss must be callable (got {type(task_loss).__name__})")
    check_steps("inner_loop", "steps", steps)
    if lr is not None:
        check_positive("inner_loop", "lr", lr)
    default_steps, default_lr, selector = steps, lr, adapt

    def run(params: Params, x: Tensor, y: Tensor, *, lr: float | Mapping[str, float | Tensor] | None = None,
            steps: int | None = None) -> tuple[Params, Tensor]:
        step_lr = default_lr if lr is None else lr
        if step_lr is None:
            raise ValueError("inner_loop: no learning rate; pass lr= to inner_loop or to the adapt call")
        n = default_steps if steps is None else steps
        names = select(params, selector, caller="inner_loop")
        fast = dict(params)
        losses: list[Tensor] = []
        with _twice_differentiable_attention(not first_order):
            fast = _sgd_steps(task_loss, fast, names, n, step_lr, x, y, losses, first_order=first_order)
        return fast, torch.stack(losses) if losses else torch.zeros(0)

    run.__name__ = "adapt"
    run.__doc__ = inner_loop.__doc__
    return run


def first_order(adapt_fn: AdaptFn) -> AdaptFn:
    """Wrap any adaptation so that ``d adapted / d params = I`` (first-order MAML as a transform).

    The wrapped inner loop runs on detached parameters (no graph is kept) and the result is re-attached as
    ``params + stopgrad(adapted - params)``: the values are those of ``adapt_fn``; the meta-gradient is the query
    gradient at the adapted parameters.

    Example:
        >>> import torch.nn.functional as F
        >>> from metafunc import functionalize
        >>> model, params = functionalize(torch.nn.Linear(1, 1))
        >>> adapt = first_order(inner_loop(lambda p, x, y: F.mse_loss(model(p, x), y), steps=2, lr=0.1))
        >>> fast, _ = adapt(params, torch.randn(4, 1), torch.randn(4, 1))
    """

    @functools.wraps(adapt_fn)
    def wrapped(params: Params, x: Tensor, y: Tensor, **kwargs) -> tuple[Params, Tensor]:
        detached = {k: v.detach() for k, v in params.items()}
        kwargs = {k: ({n: t.detach() for n, t in v.items()} if isinstance(v, dict) else v) for k, v in kwargs.items()}
        adapted, losses = adapt_fn(detached, x, y, **kwargs)
        return tree_straight_through(params, adapted), losses

    return wrapped
