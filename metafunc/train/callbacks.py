"""The pieces a long run adds to :func:`metafunc.train.fit`, one job each, called after every meta-step in the order
given: stop signals, agreement across ranks, validation, the metrics log, the progress bar, checkpoints, the barrier.

Each is a small object with optional ``start(state)``, ``after_step(state)`` and ``close(state)`` methods over the
shared :class:`~metafunc.train.fit.FitState`; a user's own callback is any object with those methods.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import IO, Any, Callable

from metafunc._shared import atomic_write_text, strict_json
from metafunc.train.checkpoint import save_checkpoint
from metafunc.train.fit import FitState

__all__ = ["STOP_SIGNALS", "EpochSchedule", "StopOnSignal", "AgreeAcrossRanks", "Validation", "MetricsLog", "ProgressBar",
           "Checkpointer", "Barrier"]

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
"""The signals that make a run stop cleanly at the end of the current meta-step."""


class StopOnSignal:
    """SIGTERM, SIGINT and SIGUSR1 (SLURM's pre-timeout signal) set ``state.stop`` after the current meta-step (main
    thread only); a second signal restores the previous handlers and re-raises it, stopping at once.

    Example:
        >>> import os, torch
        >>> p = {"w": torch.zeros(1, requires_grad=True)}
        >>> state = FitState(params=p, optimizer=torch.optim.SGD(p.values(), lr=0.1), generator=torch.Generator(),
        ...                  iterations=5)
        >>> stopper = StopOnSignal()
        >>> stopper.start(state); os.kill(os.getpid(), signal.SIGUSR1); stopper.after_step(state); stopper.close(state)
        >>> state.stop
        'SIGUSR1'
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def start(self, state: FitState) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second signal: stop now, the usual way
            self.close(None)
            signal.raise_signal(signum)
            return
        self.received = signum

    def after_step(self, state: FitState) -> None:
        if self.received is not None and state.stop is None:
            state.stop = signal.Signals(self.received).name

    def close(self, state: FitState | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class AgreeAcrossRanks:
    """Under ``torchrun``: one small all-reduce a step (``any_rank(signalled, out_of_budget)``), so that a signal or
    the time budget on any rank stops every rank at the same step.

    Example:
        >>> import torch
        >>> p = {"w": torch.zeros(1, requires_grad=True)}
        >>> state = FitState(params=p, optimizer=torch.optim.SGD(p.values(), lr=0.1), generator=torch.Generator(),
        ...                  iterations=5)
        >>> AgreeAcrossRanks(lambda *flags: (True, False)).after_step(state)  # another rank was signalled
        >>> state.stop
        'another rank'
    """

    def __init__(self, any_rank: Callable[..., tuple[bool, ...]]) -> None:
        self.any_rank = any_rank

    def after_step(self, state: FitState) -> None:
        signalled = state.stop is not None and not state.final
        signalled, out_of_budget = self.any_rank(signalled, state.stop == "budget")
        if out_of_budget:
            state.stop = "budget"
        elif signalled and state.stop is None:
            state.stop = "another rank"


class Validation:
    """Every ``every`` meta-steps, at iteration ``at`` and when the budget runs out: log
    ``{"iteration", "split": "val", **evaluate(params)}`` and keep it as ``state.last_val``.

    Example:
        >>> import torch
        >>> p = {"w": torch.zeros(1, requires_grad=True)}
        >>> state = FitState(params=p, optimizer=torch.optim.SGD(p.values(), lr=0.1), generator=torch.Generator(),
        ...                  iterations=5, iteration=2)
        >>> Validation(lambda params: {"accuracy": 0.5}, every=2, at=5).after_step(state)
        >>> state.records
        [{'iteration': 2, 'split': 'val', 'accuracy': 0.5, 'train_seconds': 0.0}]
    """

    def __init__(self, evaluate: Callable[[Any], dict[str, Any]], *, every: int, at: int) -> None:
        self.evaluate, self.every, self.at = evaluate, every, at

    def after_step(self, state: FitState) -> None:
        due = (self.every and state.iteration % self.every == 0) or state.iteration == self.at
        if due or state.stop == "budget":
            record = {"iteration": state.iteration, "split": "val", **self.evaluate(state.params),
                      "train_seconds": round(state.train_seconds, 4)}
            state.log(record)
            state.last_val = record


class MetricsLog:
    """``metrics.jsonl``: the records already in ``state.records`` (a resumed run's) rewritten atomically at the
    start, then each new record appended and flushed after every step; non-finite numbers written as ``null``.

    Example:
        >>> import json, tempfile, torch
        >>> p = {"w": torch.zeros(1, requires_grad=True)}
        >>> state = FitState(params=p, optimizer=torch.optim.SGD(p.values(), lr=0.1), generator=torch.Generator(),
        ...                  iterations=5)
        >>> log = MetricsLog(Path(tempfile.mkdtemp()) / "metrics.jsonl")
        >>> log.start(state); state.log({"iteration": 1, "loss": float("nan")}); log.after_step(state); log.close(state)
        >>> log.path.read_text()
        '{"iteration": 1, "loss": null}\\n'
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None
        self._written = 0

    def start(self, state: FitState) -> None:
        atomic_write_text(self.path, "".join(strict_json(r) + "\n" for r in state.records))
        self._written = len(state.records)
        self._file = open(self.path, "a")

    def after_step(self, state: FitState) -> None:
        if self._file is None:
            return
        for record in state.records[self._written:]:
            self._file.write(strict_json(record) + "\n")
        self._written = len(state.records)
        self._file.flush()

    def close(self, state: FitState) -> None:
        if self._file is not None:
            self.after_step(state)
            self._file.close()
            self._file = None


class ProgressBar:
    """A tqdm bar with the loss, the accuracy and the last validation ``metric``; skipped steps said on it.

    Example:
        >>> ProgressBar(total=10, initial=0, desc="maml omniglot", metric="accuracy").metric
        'accuracy'
    """

    def __init__(self, *, total: int | None, initial: int, desc: str, metric: str) -> None:
        self.total, self.initial, self.desc, self.metric = total, initial, desc, metric
        self._bar: Any = None

    def start(self, state: FitState) -> None:
        from tqdm.auto import tqdm
        self._bar = tqdm(total=self.total, initial=self.initial, desc=self.desc, dynamic_ncols=True)

    def after_step(self, state: FitState) -> None:
        record = next(r for r in reversed(state.records) if r.get("split") == "train")
        if state.nonfinite is not None and not state.failing:
            self._bar.write(f"train: iteration {state.iteration}: the {state.nonfinite} is not finite; step skipped "
                            f"({state.skipped} so far)")
        post = {"loss": f"{record.get('loss', record['objective']):.3f}"}
        if "accuracy" in record:
            post["acc"] = f"{record['accuracy']:.3f}"
        if state.last_val is not None and self.metric in state.last_val:
            post[f"val_{self.metric}"] = f"{state.last_val[self.metric]:.3f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def close(self, state: FitState) -> None:
        if self._bar is not None:
            self._bar.close()


class Checkpointer:
    """Writes ``make_state(state, iteration)`` to ``path`` atomically (the previous one kept as
    ``checkpoint.prev.pt``) every ``every`` steps, at the end, and when the run stops on a signal. After a
    non-finite step that ends the run it writes the state before that step (its task generator rewound), unless a
    checkpoint of that iteration exists already. Sets ``state.checkpoint`` to ``(path, iteration)``.

    Example:
        >>> import tempfile, torch
        >>> p = {"w": torch.zeros(1, requires_grad=True)}
        >>> state = FitState(params=p, optimizer=torch.optim.SGD(p.values(), lr=0.1), generator=torch.Generator(),
        ...                  iterations=5, iteration=2)
        >>> path = Path(tempfile.mkdtemp()) / "checkpoint.pt"
        >>> Checkpointer(path, every=2, make_state=lambda s, i: {"iteration": i, "params": s.params}).after_step(state)
        >>> state.checkpoint == (str(path), 2)
        True
    """

    def __init__(self, path: str | Path, *, every: int, make_state: Callable[[FitState, int], dict[str, Any]]) -> None:
        self.path, self.every, self.make_state = Path(path), every, make_state

    def _write(self, state: FitState, iteration: int) -> None:
        save_checkpoint(self.path, self.make_state(state, iteration))
        state.checkpoint = (str(self.path), iteration)

    def after_step(self, state: FitState) -> None:
        if state.failing:
            good = state.iteration - 1   # the failed step was not applied: the state is that of iteration ``good``
            if good > 0 and state.before_step is not None and (state.checkpoint is None
                                                                or good > state.checkpoint[1]):
                after_good = state.generator.get_state()
                state.generator.set_state(state.before_step)
                self._write(state, good)
                state.generator.set_state(after_good)
            return
        periodic = self.every and state.iteration % self.every == 0
        if periodic or state.stop is not None:
            self._write(state, state.iteration)


class Barrier:
    """Under ``torchrun``: before a run stops on a signal or a non-finite step, every rank waits here until rank 0
    has written its checkpoint.

    Example:
        >>> import torch
        >>> p = {"w": torch.zeros(1, requires_grad=True)}
        >>> state = FitState(params=p, optimizer=torch.optim.SGD(p.values(), lr=0.1), generator=torch.Generator(),
        ...                  iterations=5, stop="SIGTERM")
        >>> calls = []
        >>> Barrier(lambda: calls.append("waited")).after_step(state)
        >>> len(calls)
        1
    """

    def __init__(self, barrier: Callable[[], None]) -> None:
        self.barrier = barrier

    def after_step(self, state: FitState) -> None:
        if state.failing or (state.stop is not None and not state.final):
            self.barrier()


class EpochSchedule:
    """Tells a step that depends on the training epoch (``step.set_epoch(epoch)``, e.g.
    :class:`metafunc.train.loop.EpochAnnealedStep` for MAML++) the epoch of the next meta-step: iteration // ``every``
    (before the first step too, so a resumed run continues in its epoch).

    Example:
        >>> import torch
        >>> class Seen:
        ...     epochs = []
        ...     def set_epoch(self, epoch): self.epochs.append(epoch)
        >>> p = {"w": torch.zeros(1, requires_grad=True)}
        >>> state = FitState(params=p, optimizer=torch.optim.SGD(p.values(), lr=0.1), generator=torch.Generator(),
        ...                  iterations=9, iteration=4)
        >>> schedule = EpochSchedule(Seen(), every=3)
        >>> schedule.start(state); state.iteration = 6; schedule.after_step(state)
        >>> Seen.epochs
        [1, 2]
    """

    def __init__(self, step: Any, *, every: int) -> None:
        self.step, self.every = step, every

    def start(self, state: FitState) -> None:
        self.step.set_epoch(state.iteration // self.every)

    def after_step(self, state: FitState) -> None:
        self.step.set_epoch(state.iteration // self.every)
