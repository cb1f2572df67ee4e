"""Prototypical Networks (Snell et al., 2017): queries scored by their distance to the class means of the support
set in the encoder's feature space (the shared metric-learner pieces are in :mod:`metafunc.algorithms._metric`)."""

from __future__ import annotations

from torch import Tensor

from metafunc.algorithms._metric import WaysResolver, check_ways, metric_objectives, prototypes, squared_distances
from metafunc.algorithms.base import MetaLearner, check_model
from metafunc.core.padding import mask_logits, masked_accuracy, masked_cross_entropy, task_ways
from metafunc.core.types import Metrics, ModelFn, Params, Task

__all__ = ["protonet", "prototypes", "squared_distances", "PROTOTYPES_KEY"]

PROTOTYPES_KEY = "prototypes"
"""``protonet``'s ``adapt`` returns the encoder's parameters plus the class prototypes under this key."""


def protonet(encoder: ModelFn, *, ways: int | None = None) -> MetaLearner:
    """Prototypical Networks (Snell et al., 2017): logits are negative squared Euclidean distances from the embedded
    queries to the class means (prototypes) of the embedded support set.

    ``encoder(params, x) -> (examples, features)`` is a pure function (from :func:`metafunc.functionalize`).
    ``meta_loss(params, task)`` is the query cross-entropy; its gradient trains the encoder. ``adapt`` returns
    ``{**params, "prototypes": c}`` and ``predict(task_params, x)`` scores ``x`` against those prototypes. ``ways``
    is the number of classes per task; by default it is derived from the labels when :func:`metafunc.meta_batch`
    validates the meta-batch, and tasks may then have different numbers of ways and shots: a padded meta-batch
    (:func:`metafunc.pad_tasks`) scores each task among its own classes and real examples, as if it were alone.
    ``predict`` scores every prototype; a class absent from a task has a zero prototype, which
    :func:`metafunc.core.padding.mask_logits` masks.

    Example:
        >>> import torch
        >>> from metafunc import Task, apply_grads, functionalize, meta_value_and_grad
        >>> encoder, params = functionalize(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()))
        >>> learner = protonet(encoder)
        >>> tasks = Task(torch.randn(2, 6, 4), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2),
        ...              torch.randn(2, 3, 4), torch.tensor([[0, 1, 2]] * 2))
        >>> loss, metrics, grads = meta_value_and_grad(learner)(params, tasks)
        >>> apply_grads(params, grads)  # then optimizer.step()
    """
    name = "protonet"
    check_model(encoder, name)
    resolve_ways = WaysResolver(name, check_ways(name, ways))

    def encoder_params(params: Params) -> Params:
        return {k: v for k, v in params.items() if k != PROTOTYPES_KEY}

    def logits_of(params: Params, centres: Tensor, x: Tensor) -> Tensor:
        return -squared_distances(encoder(encoder_params(params), x), centres)

    def adapt(params: Params, x: Tensor, y: Tensor, *, steps: int | None = None) -> tuple[Params, Tensor]:
        centres = prototypes(encoder(encoder_params(params), x), y, resolve_ways(y))
        support_loss = masked_cross_entropy(logits_of(params, centres, x), y, ways=task_ways(y))
        return {**encoder_params(params), PROTOTYPES_KEY: centres}, support_loss.detach().reshape(1)

    def score(params: Params, task: Task) -> tuple[Tensor, Metrics]:
        theta = encoder_params(params)
        n = resolve_ways(task.support_y)
        centres = prototypes(encoder(theta, task.support_x), task.support_y, n)
        logits = mask_logits(-squared_distances(encoder(theta, task.query_x), centres), task_ways(task.support_y))
        loss = masked_cross_entropy(logits, task.query_y)
        return loss, {"loss": loss.detach(), "accuracy": masked_accuracy(logits, task.query_y)}

    def predict(task_params: Params, x: Tensor) -> Tensor:
        if PROTOTYPES_KEY not in task_params:
            raise ValueError(f"protonet: predict needs the task parameters returned by adapt (no {PROTOTYPES_KEY!r} key)")
        return logits_of(task_params, task_params[PROTOTYPES_KEY], x)

    meta_loss, evaluate = metric_objectives(name, score, encoder=encoder, ways=resolve_ways,
                                            encoder_params=encoder_params, padding=True)
    return MetaLearner(name=name, init=lambda p: dict(p), adapt=adapt, meta_loss=meta_loss, evaluate=evaluate,
                       predict=predict, second_order=False, model=encoder)
