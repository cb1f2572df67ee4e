"""The per-task functions the library hands out, with their eager checks carried as data.

A learner's ``meta_loss`` and ``evaluate`` are :class:`TaskFunction` objects: callables ``fn(params, task) ->
(loss, metrics)`` that also hold

* ``validate(params, tasks, vmapped, batched)``: the learner's own checks (parameter names, label range, models whose
  second-order gradients would be wrong under ``vmap``), which :func:`metafunc.meta_batch` and every meta-step run
  before any transform;
* ``thread_safe()``: whether tasks may run on several threads at once with the same numbers as one at a time.

:meth:`TaskFunction.bind` fixes keyword arguments (``steps=``) and keeps both, and :meth:`TaskFunction.checked`
adds a check in front of the existing ones. A plain callable (a lambda, a ``functools.partial``) has neither: it gets
the generic checks of the task container and runs one task at a time. Pass the learner itself
(``meta_batch(learner)``) or its ``TaskFunction`` to keep them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import Tensor

from metafunc.core.types import Metrics, Params, Task

__all__ = ["TaskFunction", "Validator", "checks_of", "per_task_function"]

Validator = Callable[..., None]
"""``validate(params, tasks, vmapped=True, batched=True) -> None``; raises ``ValueError``/``TypeError``."""


def _never_thread_safe() -> bool:
    return False


class TaskFunction:
    """A per-task function ``fn(params, task, **kwargs) -> (loss, metrics)`` with its eager checks as fields.

    Example:
        >>> import torch
        >>> from metafunc import Task
        >>> def refuse_big(params, tasks, vmapped=True, batched=True):
        ...     if tasks.support_x.abs().max() > 10:
        ...         raise ValueError("my_loss: inputs must be in [-10, 10]")
        >>> f = TaskFunction(lambda p, t: ((t.query_x * p["w"]) ** 2).mean(), validate=refuse_big, name="my_loss")
        >>> f.name, f.thread_safe()
        ('my_loss', False)
        >>> f({"w": torch.ones(())}, Task(*(torch.ones(2, 1) for _ in range(4))))
        tensor(1.)
    """

    __slots__ = ("fn", "validate", "thread_safe", "name", "__weakref__")

    def __init__(self, fn: Callable[..., Any], *, validate: Validator | None = None,
                 thread_safe: Callable[[], bool] | None = None, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"TaskFunction: fn must be callable (got {type(fn).__name__})")
        if validate is not None and not callable(validate):
            raise TypeError(f"TaskFunction: validate must be callable or None (got {type(validate).__name__})")
        if thread_safe is not None and not callable(thread_safe):
            raise TypeError(f"TaskFunction: thread_safe must be callable or None (got {type(thread_safe).__name__})")
        self.fn = fn
        self.validate = validate
        self.thread_safe = thread_safe if thread_safe is not None else _never_thread_safe
        self.name: str = name or str(getattr(fn, "__name__", "task_function"))

    @property
    def __name__(self) -> str:  # so that functools.wraps and error messages see a name
        return self.name

    def __call__(self, params: Params, task: Task, **kwargs: Any) -> tuple[Tensor, Metrics]:
        return self.fn(params, task, **kwargs)

    def bind(self, **kwargs: Any) -> TaskFunction:
        """The same function with keyword arguments fixed (``evaluate.bind(steps=10)``), keeping its checks.

        Example:
            >>> import torch
            >>> from metafunc import Task
            >>> f = TaskFunction(lambda p, t, *, scale=1.0: t.query_x.sum() * scale, name="scaled")
            >>> f.bind(scale=2.0)({}, Task(*(torch.ones(2, 1) for _ in range(4))))
            tensor(4.)
        """
        fn = self.fn
        return TaskFunction(lambda params, task: fn(params, task, **kwargs), validate=self.validate,
                            thread_safe=self.thread_safe, name=self.name)

    def checked(self, check: Validator) -> TaskFunction:
        """The same function with ``check(params, tasks, vmapped, batched)`` run before its own checks.

        Example:
            >>> import torch
            >>> from metafunc import Task
            >>> def no_w(params, tasks, vmapped=True, batched=True):
            ...     if "w" in params:
            ...         raise ValueError("f: 'w' is reserved")
            >>> f = TaskFunction(lambda p, t: t.query_x.sum(), name="f").checked(no_w)
            >>> f.validate({"w": torch.ones(())}, Task(*(torch.ones(1, 2, 1) for _ in range(4))))
            Traceback (most recent call last):
            ...
            ValueError: f: 'w' is reserved
        """
        inner = self.validate

        def validate(params: Params, tasks: Task, vmapped: bool = True, batched: bool = True) -> None:
            check(params, tasks, vmapped, batched)
            if inner is not None:
                inner(params, tasks, vmapped, batched)

        return TaskFunction(self.fn, validate=validate, thread_safe=self.thread_safe, name=self.name)

    def __repr__(self) -> str:
        return f"TaskFunction({self.name})"


def _loss_and_metrics(fn: Callable[..., Any], caller: str, name: str) -> Callable[..., tuple[Tensor, Metrics]]:
    """``fn`` returning ``(loss, metrics)`` always: a plain loss tensor gets empty metrics, anything else is refused."""

    def run(params: Params, task: Task, **kwargs: Any) -> tuple[Tensor, Metrics]:
        out = fn(params, task, **kwargs)
        if isinstance(out, Tensor):
            return out, {}
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor) and isinstance(out[1], Mapping):
            return out[0], dict(out[1])
        got = f"tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
        raise TypeError(f"{caller}: the per-task function {name} must return a loss tensor or (loss, metrics) with "
                        f"metrics a dict of tensors (got {got})")

    run.returns_loss_and_metrics = True  # type: ignore[attr-defined]
    return run


def per_task_function(per_task: Any, caller: str) -> TaskFunction:
    """The per-task function of ``per_task`` as a :class:`TaskFunction` that returns ``(loss, metrics)``.

    ``per_task`` is a :class:`metafunc.MetaLearner` (its ``meta_loss``), a :class:`TaskFunction` (its checks are
    kept) or any callable (no checks, not thread-safe). A per-task function may return a loss tensor or
    ``(loss, metrics)``; this is the one place where that is normalised, so ``meta_batch`` and the meta-steps only
    see ``(loss, metrics)``. Anything else is refused with a ``TypeError`` naming ``caller``.

    Example:
        >>> import torch
        >>> from metafunc import Task
        >>> f = per_task_function(lambda p, t: t.query_x.sum(), "meta_batch")
        >>> f({}, Task(*(torch.ones(2, 1) for _ in range(4))))
        (tensor(2.), {})
        >>> per_task_function(3, "meta_batch")
        Traceback (most recent call last):
        ...
        TypeError: meta_batch: per_task must be a MetaLearner or callable as per_task(params, task) (got int)
    """
    meta_loss = getattr(per_task, "meta_loss", None)
    if isinstance(meta_loss, TaskFunction) and hasattr(per_task, "adapt"):
        per_task = meta_loss
    elif not callable(per_task):
        raise TypeError(f"{caller}: per_task must be a MetaLearner or callable as per_task(params, task) "
                        f"(got {type(per_task).__name__})")
    if isinstance(per_task, TaskFunction):
        if getattr(per_task.fn, "returns_loss_and_metrics", False):
            return per_task
        return TaskFunction(_loss_and_metrics(per_task.fn, caller, per_task.name), validate=per_task.validate,
                            thread_safe=per_task.thread_safe, name=per_task.name)
    name = str(getattr(per_task, "__name__", type(per_task).__name__))
    return TaskFunction(_loss_and_metrics(per_task, caller, name), name=name)


def checks_of(per_task: Callable[..., Any]) -> tuple[Validator | None, Callable[[], bool]]:
    """``(validate, thread_safe)`` of a per-task function: its own for a :class:`TaskFunction`, none (and not
    thread-safe) for any other callable.

    Example:
        >>> checks_of(lambda p, t: 0.0)[0] is None
        True
    """
    if isinstance(per_task, TaskFunction):
        return per_task.validate, per_task.thread_safe
    return None, _never_thread_safe
