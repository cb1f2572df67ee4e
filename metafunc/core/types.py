"""Type aliases, the :class:`Task` container and the protocols shared by every module."""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Protocol, Union

import torch
from torch import Tensor

__all__ = ["Params", "Metrics", "Task", "ModelFn", "LossFn", "AdaptFn", "PerTaskFn", "Selector", "check_task",
           "check_labels"]

Params = dict[str, Tensor]
"""A flat dict of tensors named as in ``module.named_parameters()``."""

Metrics = dict[str, Tensor]
"""Scalar diagnostics (query loss, accuracy, ...) returned next to a loss."""

Selector = Union[None, str, "list[str]", "tuple[str, ...]", Callable[[str], bool]]
"""Chooses parameters by name: ``None`` (all), a name prefix, a sequence of prefixes, or a predicate."""


class Task(NamedTuple):
    """Support and query tensors of one task, or of a meta-batch of tasks (leading dimension).

    Example:
        >>> import torch
        >>> task = Task(torch.randn(4, 5, 1), torch.randn(4, 5, 1), torch.randn(4, 10, 1), torch.randn(4, 10, 1))
        >>> task.num_tasks
        4
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        """Size of the leading meta-batch dimension."""
        return int(self.support_x.shape[0])

    def to(self, *args, **kwargs) -> "Task":
        """Move every tensor, as :meth:`torch.Tensor.to` (integer labels keep their dtype)."""
        def move(t: Tensor) -> Tensor:
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            kw = {k: v for k, v in kwargs.items() if k != "dtype"}
            a = [x for x in args if not isinstance(x, torch.dtype)]
            return t.to(*a, **kw)

        return Task(*(move(t) for t in self))

    def __getitem__(self, index):  # type: ignore[override]
        """``task[i]`` with an int picks a field (NamedTuple); use :meth:`task_at` for the i-th task."""
        return tuple.__getitem__(self, index)

    def task_at(self, i: int) -> "Task":
        """The i-th task of a meta-batch, without its leading dimension."""
        return Task(*(t[i] for t in self))


class ModelFn(Protocol):
    """A pure model: ``model(params, x) -> output`` (what :func:`metafunc.functionalize` returns).

    Example:
        >>> from metafunc import functionalize
        >>> model, params = functionalize(torch.nn.Linear(2, 1))
        >>> model(params, torch.ones(3, 2)).shape
        torch.Size([3, 1])
    """

    def __call__(self, params: Params, x: Tensor) -> Tensor: ...


class LossFn(Protocol):
    """``loss(prediction, target) -> scalar``; the learners also accept ``"mse"`` and ``"cross_entropy"``.

    Example:
        >>> def l1(prediction: Tensor, target: Tensor) -> Tensor:
        ...     return (prediction - target).abs().mean()
        >>> l1(torch.zeros(2), torch.ones(2))
        tensor(1.)
    """

    def __call__(self, prediction: Tensor, target: Tensor) -> Tensor: ...


class AdaptFn(Protocol):
    """``adapt(params, x, y) -> (adapted_params, support_losses)``, the inner loop of one task.

    Example:
        >>> from metafunc import functionalize, inner_loop
        >>> model, params = functionalize(torch.nn.Linear(1, 1))
        >>> adapt = inner_loop(lambda p, x, y: ((model(p, x) - y) ** 2).mean(), steps=2, lr=0.1)
        >>> fast, losses = adapt(params, torch.ones(4, 1), torch.zeros(4, 1))
        >>> sorted(fast), losses.shape
        (['bias', 'weight'], torch.Size([2]))
    """

    def __call__(self, params: Params, x: Tensor, y: Tensor, *, lr: float | Mapping[str, float | Tensor] | None = None,
                 steps: int | None = None) -> tuple[Params, Tensor]: ...


class PerTaskFn(Protocol):
    """``fn(params, task) -> (loss, metrics)`` for one task; :func:`metafunc.meta_batch` batches it.

    Example:
        >>> from metafunc import functionalize, maml, meta_batch
        >>> model, params = functionalize(torch.nn.Linear(1, 1))
        >>> per_task = maml(model, inner_lr=0.1, loss="mse").meta_loss
        >>> tasks = Task(torch.randn(3, 4, 1), torch.randn(3, 4, 1), torch.randn(3, 4, 1), torch.randn(3, 4, 1))
        >>> loss, metrics = per_task(params, tasks.task_at(0))
        >>> batched_loss, _ = meta_batch(per_task)(params, tasks)
    """

    def __call__(self, params: Params, task: Task) -> tuple[Tensor, Metrics]: ...


def check_task(task: Any, *, caller: str, batched: bool = True) -> Task:
    """Shapes of a task or meta-batch: tensors, matching leading sizes, examples paired with targets.

    Example:
        >>> check_task(Task(*(torch.zeros(2, 3, 1) for _ in range(4))), caller="meta_batch").num_tasks
        2
    """
    if not isinstance(task, tuple) or len(task) != 4:
        raise TypeError(f"{caller}: task must be a metafunc.Task(support_x, support_y, query_x, query_y) (got {type(task).__name__})")
    task = Task(*task)
    for name, t in zip(Task._fields, task):
        if not isinstance(t, Tensor):
            raise TypeError(f"{caller}: task.{name} must be a tensor (got {type(t).__name__})")
    lead = 1 if batched else 0
    if batched:
        sizes = {name: t.shape[0] if t.dim() else None for name, t in zip(Task._fields, task)}
        if any(s is None for s in sizes.values()) or len(set(sizes.values())) != 1:
            raise ValueError(
                f"{caller}: every task tensor needs the same leading meta-batch size (got {sizes}); "
                "stack tasks along dim 0"
            )
        if task.support_x.shape[0] == 0:
            raise ValueError(f"{caller}: the meta-batch is empty (0 tasks); pass at least one task")
    for side in ("support", "query"):
        x, y = getattr(task, f"{side}_x"), getattr(task, f"{side}_y")
        if x.dim() < lead + 1 or y.dim() < lead + 1:
            raise ValueError(
                f"{caller}: task.{side}_x and task.{side}_y need an examples dimension"
                f"{' after the meta-batch dimension' if batched else ''} (got shapes {tuple(x.shape)} and {tuple(y.shape)})"
            )
        if x.shape[: lead + 1] != y.shape[: lead + 1]:
            raise ValueError(
                f"{caller}: task.{side}_x and task.{side}_y disagree on the number of examples "
                f"(shapes {tuple(x.shape)} and {tuple(y.shape)}); each example needs one target"
            )
        if x.shape[lead] == 0:
            raise ValueError(f"{caller}: task.{side}_x holds no examples (shape {tuple(x.shape)})")
    if task.support_x.shape[lead + 1:] != task.query_x.shape[lead + 1:]:
        raise ValueError(
            f"{caller}: support and query inputs have different example shapes "
            f"({tuple(task.support_x.shape[lead + 1:])} and {tuple(task.query_x.shape[lead + 1:])})"
        )
    if task.support_y.shape[lead + 1:] != task.query_y.shape[lead + 1:]:
        raise ValueError(
            f"{caller}: support and query targets have different shapes "
            f"({tuple(task.support_y.shape[lead + 1:])} and {tuple(task.query_y.shape[lead + 1:])})"
        )
    return task


def check_labels(caller: str, task: Task, num_classes: int) -> None:
    """Class labels must be integers in ``[0, num_classes)``.

    Example:
        >>> labels = torch.tensor([[0, 1, 2]])
        >>> check_labels("maml", Task(torch.zeros(1, 3, 2), labels, torch.zeros(1, 3, 2), labels), 3)
    """
    for name in ("support_y", "query_y"):
        y = getattr(task, name)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"{caller}: task.{name} must hold integer class labels for cross-entropy (got {y.dtype})")
        if y.numel():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"{caller}: task.{name} has labels in [{lo}, {hi}] but the model has {num_classes} outputs; "
                    f"labels must be in [0, {num_classes - 1}] (relabel each task 0..ways-1)"
                )
