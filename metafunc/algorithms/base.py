"""The learner base, public for anyone writing a learner: the :class:`MetaLearner` contract, :func:`make_learner`
(which turns an adaptation and a loss into a learner with its eager checks), the task losses and the checks.

A new model-based learner is a factory that checks its hyperparameters, builds an inner loop and returns
``make_learner(...)``; see CONTRIBUTING.md ("Adding a learner") for a worked example.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metafunc._shared import check_steps
from metafunc.core.functional import check_model_input, checked_inputs, thread_safe
from metafunc.core.padding import (
    check_padded_labels,
    check_padded_model,
    is_padded,
    mask_logits,
    masked_accuracy,
    masked_cross_entropy,
    task_ways,
    way_masked_cross_entropy,
)
from metafunc.core.task_function import TaskFunction, Validator
from metafunc.core.types import AdaptFn, LossFn, Metrics, ModelFn, Params, Task

__all__ = ["MetaLearner", "make_learner", "resolve_loss", "check_model", "task_metrics", "learner_checks", "LossSpec",
           "with_steps"]

LossSpec = Union[str, LossFn]
"""A learner's ``loss=``: ``"cross_entropy"`` (class labels), ``"mse"`` (float targets) or a callable
``loss(prediction, target) -> scalar``."""


class MetaLearner(NamedTuple):
    """An algorithm as a bundle of pure functions (no state lives here).

    * ``init(model_params) -> meta_params``: the tree the outer optimizer updates (Meta-SGD adds learning rates).
    * ``adapt(meta_params, x, y, *, steps=None) -> (task_params, support_losses)``: the inner loop of one task.
    * ``meta_loss(meta_params, task) -> (loss, metrics)``: one task's objective; its gradient is the meta-gradient.
      A meta-step over a meta-batch is ``loss, metrics, grads = metafunc.meta_value_and_grad(learner)(params, tasks)``.
    * ``evaluate(meta_params, task, *, steps=None) -> (query_loss, metrics)``: adapt then score the query set.
    * ``predict(task_params, x)``: the model's output with adapted parameters.

    ``meta_loss`` and ``evaluate`` are :class:`metafunc.TaskFunction` objects: they carry the learner's eager checks
    (``learner.validate``) and whether its tasks may run on threads (``learner.thread_safe()``), which
    :func:`metafunc.meta_batch` and every meta-step find through the learner (``meta_batch(learner)``) or through
    ``learner.meta_loss``.

    Build a model-based learner with :func:`make_learner`, which makes ``meta_loss`` and ``evaluate`` and their checks.

    Example:
        >>> from metafunc import functionalize, maml
        >>> model, params = functionalize(torch.nn.Linear(1, 1))
        >>> learner = maml(model, inner_lr=0.01, loss="mse")
        >>> meta_params = learner.init(params)
        >>> learner.name, learner.second_order, sorted(meta_params) == sorted(params)
        ('maml', True, True)
    """

    name: str
    init: Callable[[Params], Params]
    adapt: Callable[..., tuple[Params, Tensor]]
    meta_loss: TaskFunction
    evaluate: TaskFunction
    predict: Callable[[Params, Tensor], Tensor]
    second_order: bool
    model: ModelFn

    @property
    def validate(self) -> Validator | None:
        """The eager checks ``validate(params, tasks, vmapped=True, batched=True)`` of this learner's tasks."""
        return self.meta_loss.validate if isinstance(self.meta_loss, TaskFunction) else None

    def thread_safe(self) -> bool:
        """Whether this learner's tasks may run on several threads at once (no dropout, no attention)."""
        return isinstance(self.meta_loss, TaskFunction) and self.meta_loss.thread_safe()


def _mse(prediction: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(prediction, target)


def _cross_entropy(prediction: Tensor, target: Tensor) -> Tensor:
    return masked_cross_entropy(prediction, target)  # F.cross_entropy, padding examples (label -1) ignored


_LOSSES: dict[str, LossFn] = {"mse": _mse, "cross_entropy": _cross_entropy}


def resolve_loss(loss: LossSpec, caller: str) -> tuple[LossFn, bool]:
    """``(loss_fn, is_classification)`` for ``"mse"``, ``"cross_entropy"`` or a callable ``loss(pred, target)``.

    Example:
        >>> loss_fn, classification = resolve_loss("cross_entropy", "my_learner")
        >>> classification, float(loss_fn(torch.zeros(2, 3), torch.tensor([0, 2]))) == float(torch.log(torch.tensor(3.0)))
        (True, True)
        >>> resolve_loss("l2", "my_learner")
        Traceback (most recent call last):
        ...
        ValueError: my_learner: loss must be 'cross_entropy', 'mse' or a callable (got 'l2')
    """
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(f"{caller}: loss must be 'cross_entropy', 'mse' or a callable (got {loss!r})")
        return _LOSSES[loss], loss == "cross_entropy"
    if loss is way_masked_cross_entropy:
        return loss, True
    if callable(loss):
        return loss, False
    raise TypeError(f"{caller}: loss must be 'cross_entropy', 'mse' or a callable (got {type(loss).__name__})")


def check_model(model: object, caller: str) -> None:
    """Refuse a model that is not a pure ``model(params, x)`` (an ``nn.Module`` gets the ``functionalize`` fix).

    Example:
        >>> check_model(torch.nn.Linear(2, 1), "my_learner")
        Traceback (most recent call last):
        ...
        TypeError: my_learner: model must be a pure function model(params, x), not an nn.Module; use model, params = metafunc.functionalize(module)
    """
    if isinstance(model, nn.Module):
        raise TypeError(
            f"{caller}: model must be a pure function model(params, x), not an nn.Module; "
            "use model, params = metafunc.functionalize(module)"
        )
    if not callable(model):
        raise TypeError(f"{caller}: model must be callable as model(params, x) (got {type(model).__name__})")


def task_metrics(prediction: Tensor, target: Tensor, loss: Tensor, classification: bool) -> Metrics:
    """The metrics of one task: the detached ``loss``, and the ``accuracy`` of ``prediction`` for a classifier
    (over the real examples of a padded task, :mod:`metafunc.core.padding`).

    Example:
        >>> task_metrics(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), torch.tensor(0.5), True)
        {'loss': tensor(0.5000), 'accuracy': tensor(0.5000)}
    """
    metrics = {"loss": loss.detach()}
    if classification:
        metrics["accuracy"] = masked_accuracy(prediction, target)
    return metrics


def _check_module(caller: str, model: ModelFn, *, vmapped: bool, second_order: bool) -> None:
    """Refuse torch BatchNorm layers that track running statistics, and torch norm layers under vmap at second order."""
    module = getattr(model, "module", None)
    if isinstance(module, nn.Module):
        tracking = [f"{name or '<root>'} ({type(m).__name__})" for name, m in module.named_modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training]
        if tracking:
            raise ValueError(
                f"{caller}: the model has torch BatchNorm layers {tracking} in training mode that update running "
                "statistics in place, which torch.func transforms cannot do; convert them with "
                "metafunc.convert_norm_layers(module) before functionalize (or build them with "
                "track_running_stats=False)"
            )
    torch_norms = getattr(model, "torch_norm_layers", [])
    if vmapped and second_order and torch_norms:
        raise ValueError(
            f"{caller}: the model has torch norm layers {torch_norms} whose second-order gradients are wrong "
            f"under vmap on torch {torch.__version__.split('+')[0]}; convert them with "
            "metafunc.convert_norm_layers(module) before functionalize (or use first_order=True, or "
            "meta_batch(..., mode='loop'))"
        )


def _check_regression_targets(caller: str, tasks: Task) -> None:
    """``loss="mse"`` needs floating-point targets: integer labels are class labels, for cross-entropy."""
    for name in ("support_y", "query_y"):
        y = getattr(tasks, name)
        if not y.is_floating_point():
            raise TypeError(
                f"{caller}: loss='mse' needs floating-point targets but task.{name} holds {y.dtype} (class labels?); "
                f"use loss='cross_entropy' for class labels, or pass float targets (task.{name}.float())"
            )


def learner_checks(
    *,
    caller: str,
    model: ModelFn,
    classification: bool,
    second_order: bool,
    model_params: Callable[[Params], Params] = lambda p: p,
    loss_fn: LossFn | None = None,
) -> Validator:
    """The eager ``validate(params, tasks, vmapped, batched)`` of a model-based learner, which
    :func:`metafunc.meta_batch` and the meta-steps run before any transform.

    It checks the parameter names (none missing, and none the model does not take once ``model_params`` has taken
    out the meta-parameters), the task shapes, that floating-point tasks have the parameters' dtype, that
    ``loss="mse"`` (``loss_fn``) gets float targets, that the model takes the tasks' inputs (a probe on two examples,
    once per input shape, whose failure names the expected shape), the label range of a classifier, and refuses
    torch norm layers under vmap at second order, whose gradients torch 2.13 computes wrongly.

    Example:
        >>> from metafunc import Task, functionalize
        >>> model, params = functionalize(torch.nn.Linear(4, 3))
        >>> validate = learner_checks(caller="my_learner", model=model, classification=True, second_order=True)
        >>> tasks = Task(torch.randn(2, 5, 4), torch.randint(0, 3, (2, 5)), torch.randn(2, 5, 4), torch.randint(0, 3, (2, 5)))
        >>> validate(params, tasks)
        >>> validate(params, tasks._replace(query_y=tasks.query_y + 3))
        Traceback (most recent call last):
        ...
        ValueError: my_learner: task.query_y has labels in [3, ...] but the model has 3 outputs; labels must be in [0, 2] (relabel each task 0..ways-1)
    """
    out_features: dict[tuple, int] = {}

    def validate(params: Params, tasks: Task, vmapped: bool = True, batched: bool = True) -> None:
        tasks, weights = checked_inputs(params, tasks, model, model_params, caller=caller, batched=batched)
        _check_module(caller, model, vmapped=vmapped, second_order=second_order)
        if loss_fn is _mse:
            _check_regression_targets(caller, tasks)
        x = tasks.support_x[0] if batched else tasks.support_x
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in out_features:
            out = check_model_input(model, weights, x[:2], caller=caller)
            if classification and out.dim() != 2:
                raise ValueError(
                    f"{caller}: loss='cross_entropy' needs model outputs of shape (examples, classes) "
                    f"(got {tuple(out.shape)})"
                )
            out_features[key] = int(out.shape[-1]) if out.dim() else 0
        if classification:
            check_padded_labels(caller, tasks, out_features[key])
        _check_padded(caller, model, tasks, classification=classification, loss_fn=loss_fn, batched=batched)

    return validate


def _check_padded(caller: str, model: ModelFn, tasks: Task, *, classification: bool, loss_fn: LossFn | None,
                  batched: bool) -> None:
    """A padded meta-batch (:mod:`metafunc.core.padding`) needs a classification loss that skips padding and a model
    without batch statistics; with ``way_masked_cross_entropy`` each query label must be among its task's ways."""
    if loss_fn is way_masked_cross_entropy:
        support_y = tasks.support_y if batched else tasks.support_y.unsqueeze(0)
        query_y = tasks.query_y if batched else tasks.query_y.unsqueeze(0)
        ways = task_ways(support_y)
        bad = query_y >= ways.unsqueeze(-1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{caller}: task {i} has query labels beyond its support labels 0..{int(ways[i]) - 1}, "
                             "whose outputs way_masked_cross_entropy masks; relabel the query set with the support "
                             "set's labels")
    if not is_padded(tasks):
        return
    if not classification:
        raise ValueError(f"{caller}: the meta-batch is padded (labels -1, metafunc.pad_tasks) but the loss is a "
                         "custom callable, which would score the padding examples; use loss='cross_entropy' or "
                         "metafunc.way_masked_cross_entropy")
    check_padded_model(caller, model, tasks)


def make_learner(
    *,
    name: str,
    model: ModelFn,
    adapt: AdaptFn,
    loss_fn: LossFn,
    classification: bool,
    second_order: bool,
    init: Callable[[Params], Params] = lambda p: dict(p),
    split: Callable[[Params], tuple[Params, dict]] = lambda p: (p, {}),
    outer_objective: Callable[[Params, Params, Tensor], Tensor] | None = None,
) -> MetaLearner:
    """Assemble a :class:`MetaLearner` from an adaptation, a loss and how meta-parameters split: the one place where
    a model-based learner's ``meta_loss``/``evaluate`` and their checks are made (algorithms and gradient paths alike).

    ``split(meta_params) -> (model_params, adapt_kwargs)`` separates the model's weights from meta-parameters that
    the inner loop takes as keyword arguments (Meta-SGD's learning rates). ``outer_objective(model_params,
    task_params, query_loss)`` replaces the query loss as the differentiated objective (Reptile); metrics always
    report the query loss. The learner's checks are :func:`learner_checks` of ``model`` and ``loss_fn``.

    Example:
        >>> from metafunc import functionalize, inner_loop, meta_value_and_grad, sinusoid_tasks
        >>> model, params = functionalize(torch.nn.Linear(1, 1))
        >>> loss_fn, classification = resolve_loss("mse", "halved_maml")
        >>> adapt = inner_loop(lambda p, x, y: loss_fn(model(p, x), y) / 2, steps=1, lr=0.1)
        >>> learner = make_learner(name="halved_maml", model=model, adapt=adapt, loss_fn=loss_fn,
        ...                        classification=classification, second_order=True)
        >>> tasks = sinusoid_tasks(3, shots=5, generator=torch.Generator().manual_seed(0))
        >>> loss, metrics, grads = meta_value_and_grad(learner)(params, tasks)
        >>> sorted(grads), sorted(metrics)
        (['bias', 'weight'], ['loss', 'support_loss'])
    """

    def adapt_task(params: Params, x: Tensor, y: Tensor, *, steps: int | None = None) -> tuple[Params, Tensor]:
        if steps is not None:
            check_steps(name, "steps", steps, minimum=0)
        model_params, kwargs = split(params)
        return adapt(model_params, x, y, steps=steps, **kwargs)

    def score(params: Params, task: Task, steps: int | None) -> tuple[Tensor, Metrics, Params, Params]:
        model_params, _ = split(params)
        task_params, support_losses = adapt_task(params, task.support_x, task.support_y, steps=steps)
        prediction = model(task_params, task.query_x)
        if loss_fn is way_masked_cross_entropy:  # the task's ways are those of its support set
            prediction = mask_logits(prediction, task_ways(task.support_y))
            loss = masked_cross_entropy(prediction, task.query_y)
        else:
            loss = loss_fn(prediction, task.query_y)
        metrics = task_metrics(prediction, task.query_y, loss, classification)
        if support_losses.numel():
            metrics["support_loss"] = support_losses[0]
        else:  # steps=0: no inner step was taken, score the support set at the initial parameters
            metrics["support_loss"] = loss_fn(model(task_params, task.support_x), task.support_y).detach()
        return loss, metrics, model_params, task_params

    def meta_loss(params: Params, task: Task) -> tuple[Tensor, Metrics]:
        loss, metrics, model_params, task_params = score(params, task, None)
        if outer_objective is not None:
            loss = outer_objective(model_params, task_params, loss)
        return loss, metrics

    def evaluate(params: Params, task: Task, *, steps: int | None = None) -> tuple[Tensor, Metrics]:
        loss, metrics, _, _ = score(params, task, steps)
        return loss.detach(), metrics

    validate = learner_checks(caller=name, model=model, classification=classification, second_order=second_order,
                              model_params=lambda p: split(p)[0], loss_fn=loss_fn)
    safe = functools.partial(thread_safe, model)
    return MetaLearner(name=name, init=init, adapt=adapt_task,
                       meta_loss=TaskFunction(meta_loss, validate=validate, thread_safe=safe, name=f"{name}_meta_loss"),
                       evaluate=TaskFunction(evaluate, validate=validate, thread_safe=safe, name=f"{name}_evaluate"),
                       predict=lambda p, x: model(split(p)[0], x), second_order=second_order, model=model)


def with_steps(fn: Callable[..., tuple[Tensor, Metrics]], steps: int) -> Callable[[Params, Task], tuple[Tensor, Metrics]]:
    """``fn`` with ``steps=`` bound, keeping its eager checks (for ``meta_batch(with_steps(learner.evaluate, 3))``).

    Example:
        >>> from metafunc import functionalize, maml, meta_batch, sinusoid_tasks
        >>> model, params = functionalize(torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)))
        >>> learner = maml(model, inner_lr=0.01, steps=1, loss="mse")
        >>> tasks = sinusoid_tasks(4, shots=5, generator=torch.Generator().manual_seed(0))
        >>> after_10_steps, metrics = meta_batch(with_steps(learner.evaluate, 10))(params, tasks)
    """
    check_steps("with_steps", "steps", steps, minimum=0)
    if isinstance(fn, TaskFunction):
        return fn.bind(steps=steps)
    return functools.wraps(fn)(functools.partial(fn, steps=steps))
