"""The one-step ("lazy") approximation of a long inner loop (Jamal, Wang and Gong, ICCV 2021)."""

from __future__ import annotations

import functools
from typing import Callable

from torch import Tensor

from metafunc._shared import check_positive, check_steps
from metafunc.algorithms.base import LossSpec, MetaLearner, check_model, make_learner, resolve_loss
from metafunc.core.inner import inner_loop
from metafunc.core.tree import tree_detach, tree_straight_through
from metafunc.core.types import AdaptFn, ModelFn, Params, Selector
from metafunc.gradients._common import make_task_loss

__all__ = ["one_step", "one_step_adapt"]


def one_step_adapt(task_loss: Callable[[Params, Tensor, Tensor], Tensor], *, steps: int, lr: float,
                   adapt: Selector = None) -> AdaptFn:
    """Wrap an inner loop so that its result is ``phi_k`` in value and ``theta - lr * grad L_s(theta)`` in derivative.

    ``adapted = phi_1 + stopgrad(phi_k - phi_1)`` where ``phi_1 = theta - lr * grad L_s(theta)`` keeps its graph and
    ``phi_k`` comes from ``steps`` inner steps run on detached parameters. Hence
    ``d adapted / d theta = I - lr * H_s(theta)`` (on the adapted parameters) whatever ``steps`` is.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from metafunc import functionalize
        >>> model, params = functionalize(torch.nn.Linear(1, 1))
        >>> adapt = one_step_adapt(lambda p, x, y: F.mse_loss(model(p, x), y), steps=10, lr=0.1)
        >>> fast, losses = adapt(params, torch.randn(4, 1), torch.randn(4, 1))
        >>> losses.shape
        torch.Size([10])
    """
    check_steps("one_step_adapt", "steps", steps)
    check_positive("one_step_adapt", "lr", lr)
    long_loop = inner_loop(task_loss, steps=steps, lr=lr, adapt=adapt)
    one_loop = inner_loop(task_loss, steps=1, lr=lr, adapt=adapt)

    @functools.wraps(long_loop)
    def run(params: Params, x: Tensor, y: Tensor, *, steps: int | None = None, **kwargs) -> tuple[Params, Tensor]:
        phi_1, first_loss = one_loop(params, x, y, **kwargs)
        phi_k, losses = long_loop(tree_detach(params), x, y, steps=steps, **kwargs)
        return tree_straight_through(phi_1, {k: phi_k[k] for k in phi_1}), losses

    return run  # type: ignore[return-value]


def one_step(model: ModelFn, *, inner_lr: float = 0.4, steps: int = 1, loss: LossSpec = "cross_entropy",
             adapt: Selector = None) -> MetaLearner:
    """The lazy one-step approximation of the MAML meta-gradient through ``steps`` inner SGD steps.

    The inner loop runs ``steps`` steps without a graph to ``phi_k``; the meta-gradient is taken as if a single
    step from ``theta`` had led there:

        ``g = (I - inner_lr * H_s(theta)) grad L_q(phi_k)``

    where ``H_s(theta)`` is the Hessian of the support loss at the initialisation (restricted to the adapted
    parameters; parameters outside ``adapt`` get their mixed term ``-inner_lr * d^2 L_s / d w d phi``). It costs
    one Hessian-vector product per task (the double backward of one step), and memory is constant in ``steps``.
    With ``steps=1`` it is exactly MAML; for longer loops it is an approximation that keeps second-order
    information at ``theta`` (first-order MAML drops the Hessian term entirely).

    Example:
        >>> import torch
        >>> from metafunc import apply_grads, functionalize, meta_value_and_grad, models, sinusoid_tasks
        >>> model, params = functionalize(models.mlp())
        >>> learner = one_step(model, inner_lr=0.01, steps=100, loss="mse")
        >>> tasks = sinusoid_tasks(4, shots=10, generator=torch.Generator().manual_seed(0))
        >>> loss, metrics, grads = meta_value_and_grad(learner)(params, tasks)
        >>> apply_grads(params, grads)  # then optimizer.step()
    """
    name = "one_step"
    check_model(model, name)
    check_positive(name, "inner_lr", inner_lr)
    check_steps(name, "steps", steps)
    loss_fn, classification = resolve_loss(loss, name)
    adapt_fn = one_step_adapt(make_task_loss(model, loss_fn), steps=steps, lr=float(inner_lr), adapt=adapt)
    return make_learner(name=name, model=model, adapt=adapt_fn, loss_fn=loss_fn, classification=classification,
                        second_order=True)
