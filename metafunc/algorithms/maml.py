"""The MAML family: MAML, first-order MAML, ANIL, BOIL and Meta-SGD as factories of pure functions."""

from __future__ import annotations

from torch import Tensor

from metafunc._shared import check_positive, check_steps
from metafunc.algorithms.base import LossSpec, MetaLearner, check_model, make_learner, resolve_loss
from metafunc.core.inner import first_order as first_order_transform
from metafunc.core.inner import inner_loop
from metafunc.core.tree import selector_predicate
from metafunc.core.types import ModelFn, Params, Selector

__all__ = ["maml", "fomaml", "anil", "boil", "meta_sgd", "META_SGD_LR_PREFIX"]

META_SGD_LR_PREFIX = "inner_lr/"
"""Meta-SGD stores the learning rate of parameter ``name`` under ``"inner_lr/" + name`` in the meta-parameters."""


def _gradient_learner(name: str, model: ModelFn, *, inner_lr: float, steps: int, loss: LossSpec, first_order: bool,
                      adapt: Selector) -> MetaLearner:
    check_model(model, name)
    check_positive(name, "inner_lr", inner_lr)
    check_steps(name, "steps", steps)
    if not isinstance(first_order, bool):
        raise TypeError(f"{name}: first_order must be a bool (got {first_order!r})")
    loss_fn, classification = resolve_loss(loss, name)

    def task_loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(model(params, x), y)

    adapt_fn = inner_loop(task_loss, steps=steps, lr=inner_lr, adapt=adapt)
    if first_order:
        adapt_fn = first_order_transform(adapt_fn)
    return make_learner(name=name, model=model, adapt=adapt_fn, loss_fn=loss_fn, classification=classification,
                        second_order=not first_order)


def maml(model: ModelFn, *, inner_lr: float = 0.4, steps: int = 1, loss: LossSpec = "cross_entropy",
         first_order: bool = False, adapt: Selector = None) -> MetaLearner:
    """Model-Agnostic Meta-Learning (Finn et al., 2017): the exact second-order meta-gradient through ``steps``
    inner SGD steps with learning rate ``inner_lr``.

    ``meta_loss(params, task)`` adapts on the support set and returns the query loss; its gradient is the MAML
    meta-gradient. ``first_order=True`` gives first-order MAML; ``adapt`` restricts the inner loop to some
    parameters (see :func:`anil`, :func:`boil`).

    Example:
        >>> from metafunc import apply_grads, functionalize, meta_value_and_grad, models, sinusoid_tasks
        >>> model, params = functionalize(models.mlp())
        >>> learner = maml(model, inner_lr=0.01, steps=1, loss="mse")
        >>> tasks = sinusoid_tasks(4, shots=10, generator=torch.Generator().manual_seed(0))
        >>> loss, metrics, grads = meta_value_and_grad(learner)(params, tasks)
        >>> apply_grads(params, grads)  # then optimizer.step()
    """
    return _gradient_learner("maml", model, inner_lr=inner_lr, steps=steps, loss=loss, first_order=first_order,
                             adapt=adapt)


def fomaml(model: ModelFn, *, inner_lr: float = 0.4, steps: int = 1, loss: LossSpec = "cross_entropy",
           adapt: Selector = None) -> MetaLearner:
    """First-order MAML: the query gradient at the adapted parameters, with ``d phi / d theta`` taken as identity.

    No graph of the inner loop is kept, so memory does not grow with ``steps``.

    Example:
        >>> from metafunc import functionalize, models
        >>> model, params = functionalize(models.mlp())
        >>> learner = fomaml(model, inner_lr=0.01, steps=5, loss="mse")
    """
    return _gradient_learner("fomaml", model, inner_lr=inner_lr, steps=steps, loss=loss, first_order=True,
                             adapt=adapt)


def anil(model: ModelFn, *, head: Selector = "head", inner_lr: float = 0.4, steps: int = 1,
         loss: LossSpec = "cross_entropy", first_order: bool = False) -> MetaLearner:
    """Almost No Inner Loop (Raghu et al., 2020): only the head (parameters chosen by ``head``) adapts in the inner
    loop; the whole network is meta-learned in the outer loop.

    Example:
        >>> from metafunc import functionalize, models
        >>> model, params = functionalize(models.conv4(ways=5))
        >>> learner = anil(model, head="head", inner_lr=0.4, steps=5)
    """
    return _gradient_learner("anil", model, inner_lr=inner_lr, steps=steps, loss=loss, first_order=first_order,
                             adapt=head)


def boil(model: ModelFn, *, head: Selector = "head", inner_lr: float = 0.4, steps: int = 1,
         loss: LossSpec = "cross_entropy", first_order: bool = False) -> MetaLearner:
    """Body Only update in the Inner Loop (Oh et al., 2021): the head is frozen in the inner loop and every other
    parameter adapts; the whole network is meta-learned in the outer loop.

    Example:
        >>> from metafunc import functionalize, models
        >>> model, params = functionalize(models.conv4(ways=5))
        >>> learner = boil(model, head="head", inner_lr=0.4)
    """
    is_head = selector_predicate(head, "boil")
    return _gradient_learner("boil", model, inner_lr=inner_lr, steps=steps, loss=loss, first_order=first_order,
                             adapt=lambda name: not is_head(name))


def meta_sgd(model: ModelFn, *, inner_lr: float = 0.4, steps: int = 1, loss: LossSpec = "cross_entropy",
             first_order: bool = False, adapt: Selector = None) -> MetaLearner:
    """Meta-SGD (Li et al., 2017): a learning rate per parameter entry, learned in the outer loop.

    ``init(params)`` adds the learning rates to the meta-parameters under ``"inner_lr/" + name`` (initialised to
    ``inner_lr``), so a ``torch.optim`` optimizer over ``init(params).values()`` learns them with the weights. The
    inner step is ``phi <- phi - alpha * grad`` elementwise. ``first_order=True`` stops the gradient of the inner
    gradients (no Hessian term) but keeps ``d phi / d alpha = -grad``, so the learning rates still learn.

    Example:
        >>> from metafunc import functionalize, models
        >>> model, params = functionalize(models.mlp())
        >>> learner = meta_sgd(model, inner_lr=0.01, loss="mse")
        >>> meta_params = learner.init(params)
        >>> sorted(k for k in meta_params if k.startswith("inner_lr/"))[:1]
        ['inner_lr/body.0.bias']
    """
    name = "meta_sgd"
    check_model(model, name)
    check_positive(name, "inner_lr", inner_lr)
    check_steps(name, "steps", steps)
    if not isinstance(first_order, bool):
        raise TypeError(f"{name}: first_order must be a bool (got {first_order!r})")
    loss_fn, classification = resolve_loss(loss, name)
    select_adapted = selector_predicate(adapt, name)

    def task_loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(model(params, x), y)

    # First order keeps d phi / d alpha = -grad (the learning rates must still learn) and drops only the Hessian
    # term, so it stops the inner gradients rather than wrapping the loop with first_order() (which would also cut
    # the learning rates off the graph).
    adapt_fn = inner_loop(task_loss, steps=steps, adapt=adapt, first_order=first_order)

    def init(params: Params) -> Params:
        lrs = {META_SGD_LR_PREFIX + k: v.detach().new_full(v.shape, inner_lr).requires_grad_(True)
               for k, v in params.items() if not k.startswith(META_SGD_LR_PREFIX) and select_adapted(k)}
        return {**params, **lrs}

    names = set(getattr(model, "param_names", None) or ())  # a key the model does not take is refused by the checks

    def split(params: Params) -> tuple[Params, dict]:
        model_params = {k: v for k, v in params.items() if not k.startswith(META_SGD_LR_PREFIX)}
        lrs = {k[len(META_SGD_LR_PREFIX):]: v for k, v in params.items() if k.startswith(META_SGD_LR_PREFIX)}
        missing = [k for k in model_params if (not names or k in names) and select_adapted(k) and k not in lrs]
        if missing:
            raise ValueError(f"meta_sgd: the meta-parameters lack learning rates for {missing[:4]}; "
                             "build them with learner.init(params)")
        return model_params, {"lr": lrs}

    return make_learner(name=name, model=model, adapt=adapt_fn, loss_fn=loss_fn, classification=classification,
                        second_order=not first_order, init=init, split=split)
