"""The meta-training loop, thin: sample a meta-batch, take a meta-step, apply it, let the callbacks act.

:func:`fit` works over any meta-step with the contract ``step(params, tasks) -> (loss, metrics, grads)``
(:func:`metafunc.meta_value_and_grad`, :func:`metafunc.compiled_meta_step`, ``metafunc.distributed.sharded(step)``)
and any task source (``source.sample(meta_batch, generator) -> Task``). What a long run needs besides the step comes
as small callbacks, each with one job, called in the order given after every step (:mod:`metafunc.train.callbacks`:
stop signals, validation, the metrics log, the progress bar, checkpoints). The loop itself does only what every run
does: the non-finite guard (a NaN/inf loss or gradient is never applied), the learning-rate schedule, the time budget.

A run stops when ``iterations`` are done, when ``time_budget`` seconds of meta-steps are spent, when a callback sets
``state.stop`` (a signal), or on a non-finite step. After a stop by signal it raises :class:`Preempted`; after a
non-finite step it raises :class:`NonFiniteError` (unless ``on_nonfinite="skip"`` and fewer than ``max_nonfinite``
were skipped); both after every callback has seen the step, so a checkpoint callback has saved first.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Literal, Protocol, Sequence

import torch

from metafunc._shared import check_choice, check_steps
from metafunc.core.types import Params, Task
from metafunc.step import MetaStep, apply_grads

__all__ = ["fit", "FitState", "Callback", "TaskSource", "NonFiniteError", "Preempted", "nonfinite_quantity"]


class TaskSource(Protocol):
    """Anything that draws meta-batches: ``sample(meta_batch, generator) -> Task`` with a leading task dimension.

    Example:
        >>> from metafunc.data.sinusoid import SinusoidSource
        >>> source: TaskSource = SinusoidSource(shots=5, queries=5)
        >>> source.sample(3, torch.Generator().manual_seed(0)).support_x.shape
        torch.Size([3, 5, 1])
    """

    def sample(self, meta_batch: int, generator: torch.Generator) -> Task: ...


class NonFiniteError(RuntimeError):
    """The meta-loss or meta-gradient is NaN or infinite; nothing of that step was applied.

    Example:
        >>> NonFiniteError("meta-loss at iteration 3", iteration=3, checkpoint=None).iteration
        3
    """

    def __init__(self, message: str, *, iteration: int, checkpoint: str | None):
        super().__init__(message)
        self.iteration, self.checkpoint = iteration, checkpoint


class Preempted(RuntimeError):
    """A stop signal arrived; the run finished its meta-step and wrote a checkpoint at ``iteration``.

    Example:
        >>> Preempted("SIGTERM", iteration=17, checkpoint="runs/x/checkpoint.pt").iteration
        17
    """

    def __init__(self, message: str, *, iteration: int, checkpoint: str | None):
        super().__init__(message)
        self.iteration, self.checkpoint = iteration, checkpoint


@dataclasses.dataclass
class FitState:
    """Everything the loop and its callbacks share, updated in place after each meta-step.

    ``iteration`` counts meta-steps done; ``records`` holds every record logged (``"split": "train"`` per step,
    ``"split": "val"`` per validation); ``stop`` names why the run is stopping (``"iterations"``, ``"budget"``, a
    signal's name) or is ``None``; ``nonfinite`` names the non-finite quantity of the last step (not applied), else
    ``None``, and ``failing`` says that step ends the run; ``checkpoint`` is ``(path, iteration)`` of the last checkpoint written, for the errors to point at;
    ``before_step`` is the task generator's state before the last step's sampling (a checkpoint of a failed step
    rewinds to it).

    Example:
        >>> p = {"w": torch.zeros(1, requires_grad=True)}
        >>> s = FitState(params=p, optimizer=torch.optim.SGD(p.values(), lr=0.1), generator=torch.Generator(),
        ...              iterations=3)
        >>> s.iteration, s.stop, s.final
        (0, None, False)
    """

    params: Params
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    iterations: int
    iteration: int = 0
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0
    stop: str | None = None
    nonfinite: str | None = None
    skipped: int = 0
    failing: bool = False
    checkpoint: tuple[str, int] | None = None
    before_step: torch.Tensor | None = None
    last_val: dict[str, Any] | None = None

    @property
    def final(self) -> bool:
        """Whether the run ends after this step with its work done (iterations or budget), not interrupted."""
        return self.stop in ("iterations", "budget")

    def log(self, record: dict[str, Any]) -> None:
        """Append a record (the metrics-log callback writes each one once)."""
        self.records.append(record)


class Callback(Protocol):
    """One piece of a run: ``start(state)`` before the first step, ``after_step(state)`` after each, ``close(state)``
    at the end (also after an error). Any of them may be absent.

    Example:
        >>> class StopAtLoss:   # a callback of one's own: stop once the query loss is below 0.1
        ...     def after_step(self, state: FitState) -> None:
        ...         if state.records[-1]["objective"] < 0.1 and state.stop is None:
        ...             state.stop = "iterations"
        >>> isinstance(StopAtLoss(), object)
        True
    """

    def after_step(self, state: FitState) -> None: ...


def nonfinite_quantity(loss: torch.Tensor, grads: Params) -> str | None:
    """``None`` when the meta-loss and every meta-gradient are finite, else what is not (``"meta-loss"`` or
    ``"meta-gradient of head.weight, ..."``). The common case costs one reduction and one host sync.

    Example:
        >>> nonfinite_quantity(torch.tensor(1.0), {"w": torch.ones(2)}) is None
        True
        >>> nonfinite_quantity(torch.tensor(1.0), {"w": torch.tensor([1.0, float("nan")])})
        'meta-gradient of w'
    """
    total = torch.stack([g.sum() for g in grads.values()]).sum() if grads else torch.zeros(())
    if bool(torch.isfinite(loss.detach() + total.to(loss.dtype))):
        return None
    if not bool(torch.isfinite(loss.detach())):
        return "meta-loss"
    bad = [k for k, g in grads.items() if not bool(torch.isfinite(g).all())]
    return "meta-gradient of " + ", ".join(bad[:6]) + (" ..." if len(bad) > 6 else "")


def _call(callbacks: Sequence[Any], hook: str, state: FitState) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(state)


def _meta_step(step: MetaStep, source: TaskSource, meta_batch: int, state: FitState,
               lr_at: Callable[[int, float], float] | None) -> dict[str, Any]:
    """Sample, step, and apply the step unless it is not finite; the train record of the step."""
    state.before_step = state.generator.get_state()
    tasks = source.sample(meta_batch, state.generator)
    started = time.perf_counter()
    loss, metrics, grads = step(state.params, tasks)
    state.nonfinite = nonfinite_quantity(loss, grads)   # a host sync: the step's time is all counted
    record: dict[str, Any] = {"iteration": state.iteration + 1, "split": "train", "objective": float(loss)}
    record.update({k: float(v) for k, v in metrics.items()})
    if state.nonfinite is None:
        apply_grads(state.params, grads)
        if lr_at is not None:
            for group in state.optimizer.param_groups:
                group["lr"] = lr_at(state.iteration, state.train_seconds)
        state.optimizer.step()
        state.train_seconds += time.perf_counter() - started
    else:
        state.skipped += 1
        record.update({"skipped": "nonfinite", "quantity": state.nonfinite})
    record["train_seconds"] = round(state.train_seconds, 4)
    return record


def _raise_if_failed(state: FitState, on_nonfinite: str, max_nonfinite: int, advice: str) -> None:
    if state.failing:
        kept = (f"The last good state (iteration {state.checkpoint[1]}) is in {state.checkpoint[0]}"
                if state.checkpoint else "No checkpoint was written (no step was applied)")
        why = ("the run stopped" if on_nonfinite == "stop" else
               f"{max_nonfinite} non-finite steps were skipped already (--max-nonfinite {max_nonfinite})")
        raise NonFiniteError(f"train: the {state.nonfinite} is not finite at iteration {state.iteration}; the step "
                             f"was not applied and {why}. {kept}. {advice}", iteration=state.iteration,
                             checkpoint=state.checkpoint[0] if state.checkpoint else None)
    if state.stop is not None and not state.final:
        where = f"checkpoint {state.checkpoint[0]} written" if state.checkpoint else "no checkpoint written"
        raise Preempted(f"train: stopped by {state.stop} after iteration {state.iteration} of {state.iterations}; "
                        f"{where}; continue with --resume", iteration=state.iteration,
                        checkpoint=state.checkpoint[0] if state.checkpoint else None)


def fit(step: MetaStep, source: TaskSource, state: FitState, *, meta_batch: int,
        callbacks: Sequence[Any] = (), time_budget: float | None = None,
        lr_at: Callable[[int, float], float] | None = None,
        on_nonfinite: Literal["stop", "skip"] = "stop", max_nonfinite: int = 10,
        nonfinite_advice: str = "Lower the outer or inner learning rate") -> FitState:
    """Meta-train ``state.params`` with ``step`` on meta-batches of ``source`` until ``state.iterations``.

    Each iteration: sample ``meta_batch`` tasks with ``state.generator``, take ``step``, apply the meta-gradient with
    ``state.optimizer`` (at ``lr_at(iteration, train_seconds)`` when given) unless it is not finite, log the record,
    then call every callback's ``after_step(state)`` in order. ``time_budget`` stops the run after that many seconds
    of meta-steps (``state.train_seconds``; sampling, validation and checkpoints are not counted). A non-finite step
    is never applied: it stops the run (:class:`NonFiniteError`), or with ``on_nonfinite="skip"`` is skipped, up to
    ``max_nonfinite`` times. A callback that sets ``state.stop`` (a signal) ends the run with :class:`Preempted`.

    Example:
        >>> import metafunc as mf
        >>> model, params = mf.functionalize(mf.models.mlp(hidden=(8,)))
        >>> state = FitState(params=params, optimizer=torch.optim.Adam(params.values(), lr=1e-3),
        ...                  generator=torch.Generator().manual_seed(0), iterations=3)
        >>> step = mf.meta_value_and_grad(mf.maml(model, inner_lr=0.01, loss="mse"))
        >>> from metafunc.data.sinusoid import SinusoidSource
        >>> state = fit(step, SinusoidSource(shots=5, queries=5), state, meta_batch=4)
        >>> state.iteration, state.stop, [r["iteration"] for r in state.records]
        (3, 'iterations', [1, 2, 3])
    """
    check_steps("fit", "meta_batch", meta_batch)
    check_choice("fit", "on_nonfinite", on_nonfinite, ("stop", "skip"))
    _call(callbacks, "start", state)
    try:
        while state.iteration < state.iterations and state.stop is None:
            record = _meta_step(step, source, meta_batch, state, lr_at)
            state.iteration += 1
            state.log(record)
            if time_budget is not None and state.train_seconds >= time_budget:
                state.stop = "budget"
            elif state.iteration >= state.iterations:
                state.stop = "iterations"
            state.failing = state.nonfinite is not None and (on_nonfinite == "stop" or state.skipped > max_nonfinite)
            _call(callbacks, "after_step", state)
            _raise_if_failed(state, on_nonfinite, max_nonfinite, nonfinite_advice)
    finally:
        _call(callbacks, "close", state)
    return state
