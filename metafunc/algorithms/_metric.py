"""What every metric-based learner shares: prototypes, distances, the number of ways and the eager checks.

A metric learner embeds the support set with a pure encoder ``encoder(params, x) -> (examples, features)`` and
classifies queries by a distance to the embedded support set; there is no inner loop. The number of ways is fixed by
``ways=`` or derived eagerly from the labels' range when :func:`metafunc.meta_batch` validates a meta-batch.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from metafunc._shared import check_steps
from metafunc.core.functional import check_model_input, checked_inputs, thread_safe
from metafunc.core.padding import check_padded_model, check_padding, is_padded, task_ways
from metafunc.core.task_function import TaskFunction
from metafunc.core.types import Metrics, ModelFn, Params, Task

__all__ = ["prototypes", "one_hot", "squared_distances", "check_ways", "WaysResolver", "metric_checks",
           "metric_objectives"]


def prototypes(features: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Class means ``(ways, features)`` of embedded examples ``(examples, features)`` with labels in ``[0, ways)``.

    Written with a one-hot matrix product, so it runs under ``vmap`` and is differentiable in ``features``. Padding
    examples (label ``-1``, see :mod:`metafunc.core.padding`) count for no class; a class without any example gets
    a zero prototype (no division by zero), which the learners mask.

    Example:
        >>> prototypes(torch.tensor([[0.0, 2.0], [2.0, 0.0], [4.0, 4.0]]), torch.tensor([0, 0, 1]), 2)
        tensor([[1., 1.],
                [4., 4.]])
    """
    onehot = one_hot(labels, ways, features.dtype)
    counts = onehot.sum(0).clamp(min=1)
    return (onehot.transpose(0, 1) @ features) / counts.unsqueeze(-1)


def one_hot(labels: Tensor, ways: int, dtype: torch.dtype) -> Tensor:
    """``(examples, ways)`` indicator matrix; unlike ``F.one_hot`` it reads no label value, so it runs under any
    ``torch.func`` transform (``F.one_hot`` range-checks with ``.item()`` under ``grad`` inside ``vmap``)."""
    return (labels.unsqueeze(-1) == torch.arange(ways, device=labels.device)).to(dtype)


def squared_distances(queries: Tensor, centres: Tensor) -> Tensor:
    """``||q_i - c_k||^2`` as a ``(queries, centres)`` matrix (computed from differences, exact in float64).

    Example:
        >>> squared_distances(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]))
        tensor([[25.]])
    """
    diff = queries.unsqueeze(-2) - centres.unsqueeze(-3)
    return (diff * diff).sum(-1)


def check_ways(caller: str, ways: object) -> int | None:
    if ways is None:
        return None
    check_steps(caller, "ways", ways, minimum=2)
    return ways  # type: ignore[return-value]


class WaysResolver:
    """Number of classes of a task: fixed, or derived eagerly from the labels and remembered for ``vmap``.

    Under ``vmap`` labels are batched and cannot be read, so the value derived by ``validate`` (which
    :func:`metafunc.meta_batch` runs before any transform) is used.
    """

    def __init__(self, caller: str, ways: int | None):
        self.caller, self.fixed = caller, ways
        self.derived: int | None = None

    def __call__(self, support_y: Tensor) -> int:
        if self.fixed is not None:
            return self.fixed
        try:
            return int(support_y.max()) + 1
        except RuntimeError:  # batched labels under vmap: .item() is not allowed
            if self.derived is None:
                raise ValueError(
                    f"{self.caller}: cannot read the number of ways from labels under vmap; pass ways= to "
                    f"{self.caller}(...) or batch with metafunc.meta_batch (which derives it eagerly)"
                ) from None
            return self.derived


def _check_labels(caller: str, support_y: Tensor, query_y: Tensor, ways: WaysResolver, variable: bool) -> None:
    """Integer labels, padding (``-1``) only after the real examples; the number of ways fixed or derived from the
    support labels; each task's classes ``0..w-1`` in its support set (``w`` the number of ways, or with
    ``variable`` and no fixed ``ways`` the task's largest support label plus one); every query label one of its
    task's support classes. ``support_y``/``query_y`` are ``(tasks, examples)``."""
    for name, y in (("support_y", support_y), ("query_y", query_y)):
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 2:
            raise TypeError(
                f"{caller}: task.{name} must hold one integer class label per example (got dtype {y.dtype}, "
                f"shape {tuple(y.shape)})"
            )
    check_padding(caller, support_y, query_y)
    tops = task_ways(support_y)  # (tasks,)
    top = int(tops.max())
    n = ways.fixed
    if n is None:
        n = max(top, 2)
        ways.derived = n
    elif top > n:
        raise ValueError(
            f"{caller}: the labels go up to {top - 1} but ways={n} (in task.support_y); labels must be in [0, {n - 1}] "
            f"(pass ways={top} or relabel each task 0..ways-1)"
        )
    per_task = tops if variable and ways.fixed is None else torch.full_like(tops, n)
    present = torch.stack([(support_y == k).any(dim=1) for k in range(n)], dim=1)  # (tasks, ways)
    missing = (torch.arange(n, device=tops.device) < per_task.unsqueeze(1)) & ~present
    if bool(missing.any()):
        task_index, klass = (int(i) for i in missing.nonzero()[0])
        raise ValueError(
            f"{caller}: the support set of task {task_index} has no example of class {klass} "
            f"(ways={int(per_task[task_index])}); every class 0..ways-1 needs at least one support example"
        )
    bad = query_y >= per_task.unsqueeze(1)  # every class 0..w-1 is in the support set, so these are the ones it lacks
    if bool(bad.any()):
        task_index, example = (int(i) for i in bad.nonzero()[0])
        w = int(per_task[task_index])
        raise ValueError(
            f"{caller}: task {task_index} has query label {int(query_y[task_index, example])} (task.query_y, example "
            f"{example}), which is not one of its support classes 0..{w - 1} (ways={w}); every query label must be a "
            "class of its task's support set (relabel the query set with the support set's labels)"
        )


def _check_padded(caller: str, encoder: ModelFn, tasks: Task, padding: bool) -> None:
    """A padded meta-batch needs a learner that masks padding (``padding``) and an encoder without batch
    statistics."""
    if not is_padded(tasks):
        return
    if not padding:
        raise ValueError(f"{caller}: the meta-batch is padded (labels -1, metafunc.pad_tasks) but {caller} does not "
                         "mask padding examples; use protonet, proto_maml or fo_proto_maml, or meta-batches without "
                         "padding (equal ways and shots)")
    check_padded_model(caller, encoder, tasks)


def metric_checks(*, caller: str, encoder: ModelFn, ways: WaysResolver,
                  encoder_params: Callable[[Params], Params] = lambda p: p,
                  second_order: bool = False, padding: bool = False) -> Callable[..., None]:
    """The eager ``validate(params, tasks, vmapped, batched)`` of a metric learner, run by :func:`meta_batch`.

    It checks the parameter names (none missing, none the encoder does not take), that floating-point tasks have
    the parameters' dtype, that the encoder takes the tasks' inputs and returns ``(examples, features)``, that
    labels are integers, derives (or checks) the number of ways from the support labels, that every support set
    holds every class, and that every query label is one of its task's support classes. With ``padding`` (the
    learner masks padding and absent classes) and no fixed ``ways``, tasks may have different numbers of ways
    (each its largest support label plus one) and a padded meta-batch (:mod:`metafunc.core.padding`) is accepted,
    unless the encoder has batch statistics; without it, every task has every class and padding is refused.
    """
    shapes: dict[tuple, tuple[int, ...]] = {}

    def validate(params: Params, tasks: Task, vmapped: bool = True, batched: bool = True) -> None:
        tasks, theta = checked_inputs(params, tasks, encoder, encoder_params, caller=caller, batched=batched)
        if vmapped and second_order and getattr(encoder, "torch_norm_layers", []):
            raise ValueError(
                f"{caller}: the encoder has torch norm layers {encoder.torch_norm_layers} whose second-order "  # type: ignore[attr-defined]
                f"gradients are wrong under vmap on torch {torch.__version__.split('+')[0]}; convert them with "
                "metafunc.convert_norm_layers(module) before functionalize (or use meta_batch(..., mode='loop'))"
            )
        x = tasks.support_x[0] if batched else tasks.support_x
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in shapes:
            shapes[key] = tuple(check_model_input(encoder, theta, x[:2], caller=caller).shape)
        if len(shapes[key]) != 2:
            raise ValueError(
                f"{caller}: the encoder must return features of shape (examples, features) (got shape "
                f"{shapes[key]} for {min(2, x.shape[0])} examples); flatten its output, e.g. end it with nn.Flatten()"
            )
        support_y = tasks.support_y if batched else tasks.support_y.unsqueeze(0)
        query_y = tasks.query_y if batched else tasks.query_y.unsqueeze(0)
        _check_padded(caller, encoder, tasks, padding)
        _check_labels(caller, support_y, query_y, ways, variable=padding)

    return validate


def metric_objectives(name: str, score: Callable[[Params, Task], tuple[Tensor, Metrics]], *, encoder: ModelFn,
                      ways: WaysResolver, encoder_params: Callable[[Params], Params], padding: bool = False
                      ) -> tuple[TaskFunction, TaskFunction]:
    """``(meta_loss, evaluate)`` of a metric learner from its per-task ``score``, with the eager checks attached.

    A metric learner has no inner loop: ``meta_loss`` is the query loss of ``score`` and ``evaluate`` the same without
    a graph (its ``steps`` argument is accepted for the :class:`MetaLearner` contract and ignored).
    """

    def meta_loss(params: Params, task: Task) -> tuple[Tensor, Metrics]:
        return score(params, task)

    def evaluate(params: Params, task: Task, *, steps: int | None = None) -> tuple[Tensor, Metrics]:
        with torch.no_grad():
            loss, metrics = score(params, task)
        return loss.detach(), metrics

    validate = metric_checks(caller=name, encoder=encoder, ways=ways, encoder_params=encoder_params,
                             padding=padding)
    safe = functools.partial(thread_safe, encoder)
    return (TaskFunction(meta_loss, validate=validate, thread_safe=safe, name=f"{name}_meta_loss"),
            TaskFunction(evaluate, validate=validate, thread_safe=safe, name=f"{name}_evaluate"))
