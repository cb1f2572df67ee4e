"""Eager checks of user input, shared by every factory (errors name the caller, the argument and the fix)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._types import Task

__all__ = ["check_positive", "check_steps", "check_nonnegative", "check_choice", "check_task", "check_labels"]


def check_positive(caller: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{caller}: {name} must be a number (got {type(value).__name__} {value!r})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{caller}: {name} must be > 0 (got {value})")
    return float(value)


def check_nonnegative(caller: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{caller}: {name} must be a number (got {type(value).__name__} {value!r})")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{caller}: {name} must be >= 0 (got {value})")
    return float(value)


def check_steps(caller: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{caller}: {name} must be an int (got {type(value).__name__} {value!r})")
    if value < minimum:
        raise ValueError(f"{caller}: {name} must be >= {minimum} (got {value})")
    return value


def check_choice(caller: str, name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{caller}: {name} must be one of {', '.join(map(repr, choices))} (got {value!r})")
    return value


def check_task(task: Any, *, caller: str, batched: bool = True) -> Task:
    """Shapes of a task or meta-batch: tensors, matching leading sizes, examples paired with targets."""
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
    """Class labels must be integers in ``[0, num_classes)``."""
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
