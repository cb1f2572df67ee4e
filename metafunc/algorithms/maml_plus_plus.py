"""MAML++ (Antoniou, Edwards and Storkey, "How to train your MAML", ICLR 2019): MAML with the paper's fixes, each an
option of one factory.

* **Multi-step loss** (``multi_step_loss``, ``msl_epochs``): during the first ``msl_epochs`` epochs the objective is
  a weighted sum of the query losses after every inner step, with weights annealed towards the last step
  (:func:`msl_weights`); afterwards only the last step's query loss.
* **Per-step norm weights and biases** (``per_step_bn``): each normalisation layer's affine parameters get one copy
  per inner step, meta-learned and not adapted in the inner loop; step ``i`` (and the query after step ``i``) uses
  copy ``i``.
* **Learned per-layer per-step learning rates** (``learned_lrs``, LSLR): one learning rate per parameter tensor and
  per step, meta-learned.
* **Derivative-order annealing** (``first_order_epochs``): first-order inner gradients during the first epochs.
* **Cosine-annealed outer learning rate**: a schedule of the outer optimizer, not of the learner (the trainer's).

Per-step BatchNorm running statistics, the paper's sixth change, do not apply: metafunc's BatchNorm normalises every
batch with its own statistics (transductive, the MAML protocol), and so does the authors' code, which calls
``F.batch_norm(..., training=True)`` at every step, in training and evaluation alike, so the per-step running averages
it keeps never enter a forward pass.

What depends on training progress is data, not state: the learner is built for one ``epoch`` (an int the trainer
passes, ``iteration // iterations_per_epoch``, 500 iterations per epoch in the paper) and is rebuilt when it changes.
"""

from __future__ import annotations

from typing import Callable, Mapping, cast

import torch
from torch import Tensor, nn

from metafunc._shared import check_positive, check_steps
from metafunc.algorithms.base import LossSpec, MetaLearner, check_model, make_learner, resolve_loss, task_metrics
from metafunc.algorithms.maml import META_SGD_LR_PREFIX
from metafunc.core.inner import inner_loop
from metafunc.core.task_function import TaskFunction
from metafunc.core.types import LossFn, Metrics, ModelFn, Params, Task
from metafunc.nn.norm import TORCH_NORM_TYPES, BatchNorm, GroupNorm, LayerNorm

__all__ = ["maml_plus_plus", "msl_weights", "norm_parameter_names", "PER_STEP_PREFIX"]

PER_STEP_PREFIX = "per_step/"
"""MAML++ stores the copy of norm parameter ``name`` used at inner step ``i >= 1`` under ``f"per_step/{i}/{name}"``;
step 0 uses ``name`` itself."""

_NORM_TYPES: tuple[type[nn.Module], ...] = (BatchNorm, LayerNorm, GroupNorm, *TORCH_NORM_TYPES)


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """The multi-step loss weights of the query losses after steps ``0..steps-1`` at ``epoch`` (the paper's code,
    ``get_per_step_loss_importance_vector``).

    All start at ``1/steps``; each epoch moves ``1/(steps*msl_epochs)`` from every earlier step (down to a floor of
    ``0.03/steps``) to the last one (up to ``1 - (steps-1)*0.03/steps``).

    Example:
        >>> msl_weights(5, 0, 10)
        [0.2, 0.2, 0.2, 0.2, 0.2]
        >>> [round(w, 3) for w in msl_weights(5, 9, 10)]
        [0.02, 0.02, 0.02, 0.02, 0.92]
    """
    check_steps("msl_weights", "steps", steps)
    check_steps("msl_weights", "epoch", epoch, minimum=0)
    check_steps("msl_weights", "msl_epochs", msl_epochs)
    decay, floor = 1.0 / steps / msl_epochs, 0.03 / steps
    earlier = [max(1.0 / steps - epoch * decay, floor) for _ in range(steps - 1)]
    last = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return earlier + [last]


def norm_parameter_names(model: ModelFn) -> list[str]:
    """The affine parameters of the normalisation layers of a :func:`metafunc.functionalize` model (metafunc's and
    torch's BatchNorm, LayerNorm, GroupNorm, InstanceNorm); empty for a plain function.

    Example:
        >>> from metafunc import functionalize, models
        >>> model, _ = functionalize(models.conv4(ways=5, width=8))
        >>> norm_parameter_names(model)[:2]
        ['features.0.1.weight', 'features.0.1.bias']
    """
    module = getattr(model, "module", None)
    if not isinstance(module, nn.Module):
        return []
    return [f"{prefix}.{p}" if prefix else p for prefix, m in module.named_modules() if isinstance(m, _NORM_TYPES)
            for p, _ in m.named_parameters(recurse=False)]


def _check_options(name: str, *, inner_lr: float, steps: int, flags: Mapping[str, object],
                   counts: Mapping[str, int]) -> None:
    check_positive(name, "inner_lr", inner_lr)
    check_steps(name, "steps", steps)
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {flag} must be a bool (got {value!r})")
    for option, value in counts.items():
        check_steps(name, option, value, minimum=1 if option == "msl_epochs" else 0)


def _per_step(norm_names: list[str], steps: int, learned_lrs: bool, adapted: Callable[[str], bool], inner_lr: float
              ) -> tuple[Callable[[Params], Params], Callable[[Params], tuple[Params, dict]]]:
    """``init`` and ``split`` of the meta-parameters: the model's weights, the per-step norm copies, the rates."""
    copies = [f"{PER_STEP_PREFIX}{i}/{n}" for i in range(1, steps) for n in norm_names]

    def init(params: Params) -> Params:
        model_params = {k: v for k, v in params.items() if not k.startswith((PER_STEP_PREFIX, META_SGD_LR_PREFIX))}
        out = dict(model_params)
        for key in copies:
            out[key] = model_params[key.split("/", 2)[2]].detach().clone().requires_grad_(True)
        if learned_lrs:
            for k, v in model_params.items():
                if adapted(k):
                    out[META_SGD_LR_PREFIX + k] = v.detach().new_full((steps,), inner_lr).requires_grad_(True)
        return out

    def split(params: Params) -> tuple[Params, dict]:
        model_params = {k: v for k, v in params.items() if not k.startswith((PER_STEP_PREFIX, META_SGD_LR_PREFIX))}
        lrs = {k[len(META_SGD_LR_PREFIX):]: v for k, v in params.items() if k.startswith(META_SGD_LR_PREFIX)}
        missing = [k for k in copies if k not in params]
        if learned_lrs:
            missing += [META_SGD_LR_PREFIX + k for k in model_params if adapted(k) and k not in lrs]
        if missing:
            raise ValueError(f"maml_plus_plus: the meta-parameters lack {missing[:4]}; build them with "
                             "learner.init(params)")
        norms = {k: v for k, v in params.items() if k.startswith(PER_STEP_PREFIX)}
        return model_params, {"lr": lrs if learned_lrs else None, "norms": norms}

    return init, split


def _unroll(step: Callable[..., tuple[Params, Tensor]], norm_names: list[str], steps: int, inner_lr: float,
            params: Params, x: Tensor, y: Tensor, n: int, lrs: Mapping[str, float | Tensor] | None,
            norms: Mapping[str, Tensor]) -> tuple[list[Params], Tensor]:
    """The parameters after each of ``n`` inner steps (step ``i`` with its norm copy and its rates; steps past the
    trained number reuse the last ones) and the support losses before each step."""
    fast, trail, losses = dict(params), [], []
    for i in range(n):
        k = min(i, steps - 1)
        if k > 0:
            fast = {**fast, **{name: norms[f"{PER_STEP_PREFIX}{k}/{name}"] for name in norm_names}}
        lr: float | dict[str, Tensor] = inner_lr if lrs is None else {
            name: cast(Tensor, r)[k] for name, r in lrs.items()}
        fast, loss = step(fast, x, y, lr=lr)
        trail.append(fast)
        losses.append(loss)
    return trail, torch.cat(losses) if losses else torch.zeros(0)


def maml_plus_plus(model: ModelFn, *, inner_lr: float = 0.1, steps: int = 5, loss: LossSpec = "cross_entropy",
                   multi_step_loss: bool = True, msl_epochs: int = 10, per_step_bn: bool = True,
                   learned_lrs: bool = True, first_order_epochs: int = 0, epoch: int = 0) -> MetaLearner:
    """MAML++ (Antoniou et al., 2019) at training epoch ``epoch``; with every option off it is :func:`maml`.

    ``multi_step_loss``: while ``epoch < msl_epochs`` the objective is ``sum_i msl_weights(steps, epoch,
    msl_epochs)[i] * query_loss(phi_i)`` over the parameters ``phi_i`` after each inner step; then the last step's
    query loss. ``per_step_bn``: the norm layers' weights and biases (:func:`norm_parameter_names`) have one copy per
    inner step (``name`` for step 0, ``"per_step/{i}/" + name`` for step ``i``), meta-learned and left out of the
    inner loop. ``learned_lrs``: ``init`` adds ``"inner_lr/" + name`` of shape ``(steps,)``, initialised to
    ``inner_lr``, the rate of each adapted tensor at each step (LSLR). ``first_order_epochs``: while ``epoch <
    first_order_epochs`` the inner gradients are first order (the weights' meta-gradient is first-order MAML's; the
    rates still learn through ``d phi / d lr = -grad``). The paper's defaults: 5 steps, rates from 0.1, MSL over 10
    epochs of 500 iterations; its Omniglot configs use no first-order epochs (``first_order_to_second_order_epoch:
    -1``). Evaluating with more steps than ``steps`` reuses the last step's norm copy and rates.

    Example:
        >>> from metafunc import Task, apply_grads, functionalize, meta_value_and_grad, models
        >>> model, params = functionalize(models.conv4(ways=3, width=8, image_size=16))
        >>> learner = maml_plus_plus(model, inner_lr=0.1, steps=2, epoch=0)
        >>> meta_params = learner.init(params)
        >>> sorted(k for k in meta_params if k.startswith(("per_step/1/features.0", "inner_lr/head")))
        ['inner_lr/head.bias', 'inner_lr/head.weight', 'per_step/1/features.0.1.bias', 'per_step/1/features.0.1.weight']
        >>> labels = torch.arange(3).repeat(4, 2)
        >>> tasks = Task(torch.randn(4, 6, 1, 16, 16), labels, torch.randn(4, 6, 1, 16, 16), labels)
        >>> loss, metrics, grads = meta_value_and_grad(learner)(meta_params, tasks)
        >>> apply_grads(meta_params, grads)  # then optimizer.step(); rebuild with epoch=... as training goes on
    """
    name = "maml_plus_plus"
    check_model(model, name)
    _check_options(name, inner_lr=inner_lr, steps=steps,
                   flags={"multi_step_loss": multi_step_loss, "per_step_bn": per_step_bn, "learned_lrs": learned_lrs},
                   counts={"msl_epochs": msl_epochs, "first_order_epochs": first_order_epochs, "epoch": epoch})
    loss_fn, classification = resolve_loss(loss, name)
    norm_names = norm_parameter_names(model) if per_step_bn else []
    frozen = set(norm_names)

    def adapted(key: str) -> bool:
        return key not in frozen

    first_order = epoch < first_order_epochs
    step = inner_loop(lambda p, x, y: loss_fn(model(p, x), y), steps=1, first_order=first_order,
                      adapt=adapted if frozen else None)
    init, split = _per_step(norm_names, steps, learned_lrs, adapted, inner_lr)

    default_steps = steps

    def adapt(params: Params, x: Tensor, y: Tensor, *, lr: Mapping[str, float | Tensor] | float | None = None,
              steps: int | None = None, norms: Mapping[str, Tensor] | None = None) -> tuple[Params, Tensor]:
        # lr: the learned rates of shape (steps,) by name, or one rate (None: inner_lr); norms: the per-step copies
        n = default_steps if steps is None else steps
        rates = lr if isinstance(lr, Mapping) else None
        fixed = inner_lr if lr is None or rates is not None else float(cast(float, lr))
        trail, losses = _unroll(step, norm_names, default_steps, fixed, params, x, y, n, rates, norms or {})
        return (trail[-1] if trail else dict(params)), losses

    learner = make_learner(name=name, model=model, adapt=adapt, loss_fn=loss_fn, classification=classification,
                           second_order=not first_order, init=init, split=split)
    weights = msl_weights(steps, epoch, msl_epochs) if multi_step_loss and epoch < msl_epochs else None
    meta_loss = _meta_loss(model, loss_fn, classification, split, step, norm_names, steps, inner_lr, weights)
    return learner._replace(meta_loss=TaskFunction(meta_loss, validate=learner.validate,
                                                   thread_safe=learner.meta_loss.thread_safe, name=f"{name}_meta_loss"))


def _meta_loss(model: ModelFn, loss_fn: LossFn, classification: bool, split: Callable[[Params], tuple[Params, dict]],
               step: Callable[..., tuple[Params, Tensor]], norm_names: list[str], steps: int, inner_lr: float,
               weights: list[float] | None) -> Callable[[Params, Task], tuple[Tensor, Metrics]]:
    """One task's objective: the MSL-weighted query losses after every step (``weights``), else the last one."""

    def meta_loss(params: Params, task: Task) -> tuple[Tensor, Metrics]:
        model_params, kwargs = split(params)
        trail, support_losses = _unroll(step, norm_names, steps, inner_lr, model_params, task.support_x,
                                        task.support_y, steps, kwargs["lr"], kwargs["norms"])
        prediction = model(trail[-1], task.query_x)
        last = loss_fn(prediction, task.query_y)
        metrics = task_metrics(prediction, task.query_y, last, classification)
        metrics["support_loss"] = support_losses[0]
        if weights is None:
            return last, metrics
        objective = weights[-1] * last
        for w, phi in zip(weights[:-1], trail[:-1]):
            objective = objective + w * loss_fn(model(phi, task.query_x), task.query_y)
        return objective, metrics

    return meta_loss
