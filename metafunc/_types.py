"""Type aliases, the :class:`Task` container and the protocols shared by every module."""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol, Union

import torch
from torch import Tensor

__all__ = ["Params", "Metrics", "Task", "ModelFn", "LossFn", "AdaptFn", "PerTaskFn", "Selector"]

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

    def __call__(self, params: Params, x: Tensor, y: Tensor, **kwargs) -> tuple[Params, Tensor]: ...


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
