"""Reptile (Nichol et al., 2018): move the initialisation toward the weights adapted on each task."""

from __future__ import annotations

from torch import Tensor

from metafunc._shared import check_positive, check_steps
from metafunc.algorithms.base import LossSpec, MetaLearner, check_model, make_learner, resolve_loss
from metafunc.core.inner import first_order as first_order_transform
from metafunc.core.inner import inner_loop
from metafunc.core.types import ModelFn, Params, Selector

__all__ = ["reptile"]


def reptile(model: ModelFn, *, inner_lr: float = 0.1, steps: int = 5, loss: LossSpec = "cross_entropy",
            adapt: Selector = None) -> MetaLearner:
    """Reptile: ``steps`` SGD steps on the support set to ``phi``, then the meta-update ``theta <- theta +
    epsilon * (phi - theta)``.

    ``meta_loss`` is the surrogate ``0.5 * ||theta - stopgrad(phi)||^2`` whose gradient is exactly ``theta - phi``,
    so ``torch.optim.SGD(lr=epsilon)`` on the meta-batch mean performs Reptile's interpolation step with step size
    epsilon (any other optimizer uses ``theta - phi`` as its gradient, as in the paper's Adam variant). The
    reported ``metrics["loss"]`` is the query loss after adaptation.

    Example:
        >>> from metafunc import apply_grads, functionalize, meta_value_and_grad, models, sinusoid_tasks
        >>> model, params = functionalize(models.mlp())
        >>> learner = reptile(model, inner_lr=0.01, steps=5, loss="mse")
        >>> opt = torch.optim.SGD(params.values(), lr=0.1)   # epsilon = 0.1
        >>> tasks = sinusoid_tasks(4, shots=10, generator=torch.Generator().manual_seed(0))
        >>> surrogate, metrics, grads = meta_value_and_grad(learner)(params, tasks)
        >>> apply_grads(params, grads); opt.step()
    """
    name = "reptile"
    check_model(model, name)
    check_positive(name, "inner_lr", inner_lr)
    check_steps(name, "steps", steps)
    loss_fn, classification = resolve_loss(loss, name)

    def task_loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(model(params, x), y)

    adapt_fn = first_order_transform(inner_loop(task_loss, steps=steps, lr=inner_lr, adapt=adapt))

    def toward_adapted(model_params: Params, task_params: Params, query_loss: Tensor) -> Tensor:
        return 0.5 * sum(((model_params[k] - task_params[k].detach()) ** 2).sum() for k in model_params)  # type: ignore[return-value]

    return make_learner(name=name, model=model, adapt=adapt_fn, loss_fn=loss_fn, classification=classification,
                        second_order=False, outer_objective=toward_adapted)
