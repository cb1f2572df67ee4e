"""Reptile (Nichol et al., 2018): move the initialisation toward the weights adapted on each task."""

from __future__ import annotations

import math
from typing import Callable, Literal, Mapping

import torch
from torch import Tensor
from torch.func import grad_and_value

from metafunc._shared import check_choice, check_positive, check_steps, under_func_transform
from metafunc.algorithms.base import LossSpec, MetaLearner, check_model, make_learner, resolve_loss
from metafunc.core.inner import first_order as first_order_transform
from metafunc.core.inner import inner_loop, sgd_step
from metafunc.core.tree import select
from metafunc.core.types import AdaptFn, ModelFn, Params, Selector

__all__ = ["reptile"]

ADAM_BETA2 = 0.999
"""The inner Adam's second-moment decay (its first-moment decay is 0, as in openai/supervised-reptile)."""
ADAM_EPS = 1e-8
"""The inner Adam's epsilon, added to the bias-corrected ``sqrt(v)`` as ``torch.optim.Adam`` does."""

_OPTIMIZERS = ("sgd", "adam")


def _batch_indices(step: int, size: int | None, n: int) -> Tensor | None:
    """The support examples of inner step ``step`` (0-based): consecutive batches of ``size`` through the support set
    in its given order, wrapping around (``None``: the whole set, also when ``size >= n``)."""
    if size is None or size >= n:
        return None
    return torch.tensor([(step * size + j) % n for j in range(size)])


def _gradient(task_loss: Callable[[Params, Tensor, Tensor], Tensor], fast: Params, names: list[str], x: Tensor,
              y: Tensor) -> tuple[Params, Tensor]:
    """``(grads of task_loss on names, loss)``, both without a graph (Reptile's inner loop is never differentiated):
    :func:`torch.func.grad_and_value` under a transform (vmap), plain ``torch.autograd.grad`` otherwise."""
    if under_func_transform():
        def loss_of(adapted: Params) -> Tensor:
            return task_loss({**fast, **adapted}, x, y)

        grads, loss = grad_and_value(loss_of)({k: fast[k] for k in names})
        return {k: g.detach() for k, g in grads.items()}, loss.detach()
    inputs = [fast[k].detach().requires_grad_() for k in names]
    with torch.enable_grad():
        loss = task_loss({**fast, **dict(zip(names, inputs))}, x, y)
        found = torch.autograd.grad(loss, inputs, allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for k, v, g in zip(names, inputs, found)}, loss.detach()


def _adam_step(fast: Params, grads: Params, v: Params, t: int,
               lr: float | Mapping[str, float | Tensor]) -> tuple[Params, Params]:
    """Adam with beta1 = 0 at step ``t`` (1-based): ``v <- b2 v + (1 - b2) g^2``, ``p <- p - lr g / (sqrt(v) /
    sqrt(1 - b2^t) + eps)`` (beta1 = 0 makes the first moment the gradient itself, with no bias correction)."""
    correction = math.sqrt(1 - ADAM_BETA2 ** t)
    v = {k: ADAM_BETA2 * v[k] + (1 - ADAM_BETA2) * g * g for k, g in grads.items()}
    step = {k: (lr[k] if isinstance(lr, Mapping) else lr) * g / (v[k].sqrt() / correction + ADAM_EPS)
            for k, g in grads.items()}
    return {**fast, **{k: fast[k] - d for k, d in step.items()}}, v


def _support_loop(task_loss: Callable[[Params, Tensor, Tensor], Tensor], *, steps: int, lr: float,
                  optimizer: str, batch_size: int | None, adapt: Selector) -> AdaptFn:
    """``adapt(params, x, y, *, lr=None, steps=None) -> (phi, losses)``: ``steps`` SGD or Adam(beta1 = 0) steps, each
    on the mini-batch of :func:`_batch_indices` (the Adam state starts at zero for each task and lives only in this
    call); ``lr`` and ``steps`` given at call time override the defaults, as in :func:`metafunc.inner_loop`."""

    def run(params: Params, x: Tensor, y: Tensor, *, lr: float | Mapping[str, float | Tensor] | None = None,
            steps: int | None = None) -> tuple[Params, Tensor]:
        n = default_steps if steps is None else steps
        step_lr = default_lr if lr is None else lr
        names = select(params, adapt, caller="reptile")
        fast = dict(params)
        v = {k: torch.zeros_like(fast[k]) for k in names}
        losses: list[Tensor] = []
        for t in range(n):
            idx = _batch_indices(t, batch_size, x.shape[0])
            xb, yb = (x, y) if idx is None else (x.index_select(0, idx.to(x.device)), y.index_select(0, idx.to(y.device)))
            grads, loss = _gradient(task_loss, fast, names, xb, yb)
            if optimizer == "adam":
                fast, v = _adam_step(fast, grads, v, t + 1, step_lr)
            else:
                fast = sgd_step(fast, grads, step_lr)
            losses.append(loss)
        return fast, torch.stack(losses) if losses else torch.zeros(0)

    default_steps, default_lr = steps, lr
    run.__name__ = "adapt"
    return run


def reptile(model: ModelFn, *, inner_lr: float = 0.1, steps: int = 5, loss: LossSpec = "cross_entropy",
            adapt: Selector = None, inner_optimizer: Literal["sgd", "adam"] = "sgd",
            inner_batch_size: int | None = None, eval_batch_size: int | None = None) -> MetaLearner:
    """Reptile: ``steps`` inner steps on the support set to ``phi``, then the meta-update ``theta <- theta +
    epsilon * (phi - theta)``.

    ``meta_loss`` is the surrogate ``0.5 * ||theta - stopgrad(phi)||^2`` whose gradient is exactly ``theta - phi``,
    so ``torch.optim.SGD(lr=epsilon)`` on the meta-batch mean performs Reptile's interpolation step with step size
    epsilon (any other optimizer uses ``theta - phi`` as its gradient, as in the paper's Adam variant). The
    reported ``metrics["loss"]`` is the query loss after adaptation.

    The inner loop (openai/supervised-reptile's options): ``inner_optimizer="sgd"`` (default) or ``"adam"``, Adam
    with beta1 = 0, beta2 = 0.999, eps = 1e-8 at step size ``inner_lr``, its state fresh for each task.
    ``inner_batch_size=b`` takes each step on ``b`` support examples: step ``t`` uses examples ``t*b .. t*b + b - 1``
    modulo the support size, in the support set's given order (the samplers shuffle it per task), so ``steps * b``
    equal to the support size is one pass over it; deterministic, the same under vmap and in a loop. ``None`` (or a
    ``b`` at least the support size) uses the whole support set. ``eval_batch_size`` is the batch of ``evaluate``
    (default ``inner_batch_size``; the paper's ``--eval-batch``). ``metrics["support_loss"]`` is the loss of the first
    step's batch.

    Example:
        >>> from metafunc import apply_grads, functionalize, meta_value_and_grad, models, sinusoid_tasks
        >>> model, params = functionalize(models.mlp())
        >>> learner = reptile(model, inner_lr=0.01, steps=5, loss="mse")
        >>> opt = torch.optim.SGD(params.values(), lr=0.1)   # epsilon = 0.1
        >>> tasks = sinusoid_tasks(4, shots=10, generator=torch.Generator().manual_seed(0))
        >>> surrogate, metrics, grads = meta_value_and_grad(learner)(params, tasks)
        >>> apply_grads(params, grads); opt.step()
        >>> paper = reptile(model, inner_lr=1e-3, steps=5, loss="mse", inner_optimizer="adam", inner_batch_size=2)
        >>> phi, support_losses = paper.adapt(params, tasks.support_x[0], tasks.support_y[0])
        >>> support_losses.shape   # one loss per step, each on its batch of 2 of the 10 support points
        torch.Size([5])
    """
    name = "reptile"
    check_model(model, name)
    check_positive(name, "inner_lr", inner_lr)
    check_steps(name, "steps", steps)
    check_choice(name, "inner_optimizer", inner_optimizer, _OPTIMIZERS)
    for option, value in (("inner_batch_size", inner_batch_size), ("eval_batch_size", eval_batch_size)):
        if value is not None:
            check_steps(name, option, value)
    loss_fn, classification = resolve_loss(loss, name)
    eval_batch_size = inner_batch_size if eval_batch_size is None else eval_batch_size

    def task_loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(model(params, x), y)

    def adaptation(batch_size: int | None) -> AdaptFn:
        if inner_optimizer == "sgd" and batch_size is None:  # plain full-batch SGD: the shared inner loop
            return first_order_transform(inner_loop(task_loss, steps=steps, lr=inner_lr, adapt=adapt))
        return first_order_transform(_support_loop(task_loss, steps=steps, lr=inner_lr, optimizer=inner_optimizer,
                                                   batch_size=batch_size, adapt=adapt))

    def toward_adapted(model_params: Params, task_params: Params, query_loss: Tensor) -> Tensor:
        return 0.5 * sum(((model_params[k] - task_params[k].detach()) ** 2).sum() for k in model_params)  # type: ignore[return-value]

    def build(batch_size: int | None) -> MetaLearner:
        return make_learner(name=name, model=model, adapt=adaptation(batch_size), loss_fn=loss_fn,
                            classification=classification, second_order=False, outer_objective=toward_adapted)

    learner = build(inner_batch_size)
    if eval_batch_size == inner_batch_size:
        return learner
    return learner._replace(evaluate=build(eval_batch_size).evaluate)
