"""The meta-training loop behind ``metafunc train``: generic over a task source, a model and a learner.

The pieces, each replaceable:

* a **task source**: anything with ``sample(meta_batch, generator) -> Task`` (``metafunc.data.SinusoidSource``,
  ``GaussianClassification``, ``EpisodeSampler``);
* a **learner** from the registry (:data:`metafunc.LEARNERS`, ``config.algorithm``);
* the **meta-step** :func:`metafunc.meta_value_and_grad`, the same default step a user gets from the README, which a
  distributed run wraps with ``wrap_step=metafunc.distributed.sharded``;
* a **rank flag** ``is_main``: only the main process writes ``metrics.jsonl``, checkpoints and plots.

A run is fully determined by its :class:`TrainConfig`; its checkpoint stores the meta-parameters, the optimizer state
and the generator states, so ``train(config, resume=True)`` continues bit for bit where it stopped.

Long runs lose nothing:

* a non-finite meta-loss or meta-gradient is caught before it is applied (one reduction per step) and stops the run
  with :class:`NonFiniteError` (``metafunc train`` exits with :data:`EXIT_NONFINITE`), or, with
  ``on_nonfinite="skip"``, skips that step and logs it, up to ``max_nonfinite`` steps;
* SIGTERM, SIGINT and SIGUSR1 (SLURM's pre-timeout signal) let the current meta-step finish, then the run writes a
  checkpoint, flushes its logs and raises :class:`Preempted` (:data:`EXIT_PREEMPTED`); ``--resume`` continues bit for
  bit. Under ``torchrun`` every rank stops at the same step (``sync_flag``) and rank 0 writes the checkpoint;
* a checkpoint that cannot be written (disk full, permission denied) keeps the previous one and raises
  :class:`metafunc.train.checkpoint.CheckpointError` (:data:`EXIT_CHECKPOINT`).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from metafunc._shared import atomic_write_text, strict_json
from metafunc.core.types import Params
from metafunc.step import MetaStep, apply_grads, meta_value_and_grad
from metafunc.train.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from metafunc.train.config import RESUME_KEYS, ResolvedConfig, TrainConfig, resolve_config
from metafunc.train.evaluation import TaskSource, evaluate_episodes
from metafunc.train.experiment import Experiment, build_experiment
from metafunc.train.plots import plot_learning_curve

__all__ = ["TrainResult", "train", "default_is_main", "checkpoint_state", "restore_checkpoint", "trainer_step",
           "NonFiniteError", "Preempted", "EXIT_NONFINITE", "EXIT_PREEMPTED", "EXIT_CHECKPOINT", "STOP_SIGNALS",
           "nonfinite_quantity", "outer_optimizer", "outer_lr_at"]

EXIT_NONFINITE = 3
"""``metafunc train``'s exit status when the meta-loss or meta-gradient stopped being finite."""
EXIT_CHECKPOINT = 4
"""``metafunc train``'s exit status when a checkpoint could not be written (the previous one is intact)."""
EXIT_PREEMPTED = 75
"""``metafunc train``'s exit status after a stop signal: a checkpoint was written; restart with ``--resume``
(75 is ``EX_TEMPFAIL``: a temporary failure, try again)."""
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
"""The signals that make a run stop cleanly at the end of the current meta-step."""


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


class _StopSignals:
    """Turns SIGTERM/SIGINT/SIGUSR1 into a flag that the loop reads after each meta-step (main thread only); a
    second signal of the same run restores the previous handlers' behaviour and re-raises it."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second signal: stop now, the usual way
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def trainer_step(exp: Experiment, cfg: ResolvedConfig) -> MetaStep:
    """The meta-step ``metafunc train`` takes: :func:`metafunc.meta_value_and_grad` of the run's learner with the
    run's ``mode`` and ``chunk_size`` (a task or a chunk differentiated as soon as it has run).

    Example:
        >>> exp = build_experiment(resolve_config(TrainConfig(dataset="synthetic", width=8)))
        >>> step = trainer_step(exp, resolve_config(TrainConfig(dataset="synthetic", width=8)))
        >>> loss, metrics, grads = step(exp.params, exp.sources["train"].sample(4, torch.Generator().manual_seed(0)))
        >>> sorted(grads) == sorted(exp.params)
        True
    """
    return meta_value_and_grad(exp.learner, mode=cfg.mode, chunk_size=cfg.chunk_size)  # type: ignore[arg-type]


def default_is_main() -> bool:
    """True unless torchrun's ``RANK`` says this is not rank 0 (only rank 0 writes logs, plots and checkpoints).

    Example:
        >>> isinstance(default_is_main(), bool)
        True
    """
    return int(os.environ.get("RANK", "0") or 0) == 0


class TrainResult(NamedTuple):
    """The trained meta-parameters, the records written to ``metrics.jsonl``, and where the files are.

    Example:
        >>> import tempfile
        >>> cfg = TrainConfig(dataset="synthetic", iterations=4, width=8, out=tempfile.mkdtemp())
        >>> result = train(cfg, progress=False, stop_after=2)  # interrupted after 2 of 4 iterations
        >>> [(r["iteration"], r["split"]) for r in result.records]
        [(1, 'train'), (2, 'train')]
        >>> sorted(p.name for p in result.out.iterdir())  # resume=True would continue from the checkpoint
        ['checkpoint.pt', 'config.json', 'metrics.jsonl']
        >>> result.config.meta_batch, sorted(result.params) == sorted(result.experiment.params)
        (8, True)
    """

    params: Params
    records: list[dict[str, Any]]
    out: Path
    config: ResolvedConfig
    experiment: Experiment
    seconds: float
    train_seconds: float = 0.0
    """Seconds spent in meta-steps (sampling, validation and checkpoints excluded): what ``time_budget`` counts."""


def checkpoint_state(cfg: ResolvedConfig, iteration: int, params: Params, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, records: list[dict[str, Any]], seconds: float,
                     train_seconds: float = 0.0) -> dict[str, Any]:
    """Everything a run needs to continue exactly: parameters, optimizer, generator and torch RNG states.

    Example:
        >>> p = {"w": torch.zeros(2, requires_grad=True)}
        >>> state = checkpoint_state(TrainConfig(), 0, p, torch.optim.Adam(p.values()), torch.Generator(), [], 0.0)
        >>> sorted(state)[:3]
        ['config', 'iteration', 'optimizer']
    """
    return {
        "config": cfg.to_dict(),
        "iteration": int(iteration),
        "params": {k: v.detach().cpu().clone() for k, v in params.items()},
        "optimizer": optimizer.state_dict(),
        "rng": {"tasks": generator.get_state(), "torch": torch.get_rng_state()},
        "val": [r for r in records if r.get("split") == "val"],
        "seconds": float(seconds),
        "train_seconds": float(train_seconds),
        "time_budget": cfg.time_budget,
    }


def outer_optimizer(cfg: ResolvedConfig, params: Params) -> torch.optim.Optimizer:
    """The meta-update's optimizer: ``torch.optim.Adam`` or ``torch.optim.SGD`` at ``cfg.outer_lr``
    (``cfg.outer_optimizer``).

    Example:
        >>> p = {"w": torch.zeros(2, requires_grad=True)}
        >>> type(outer_optimizer(resolve_config(TrainConfig(outer_optimizer="sgd")), p)).__name__
        'SGD'
    """
    if cfg.outer_optimizer == "sgd":
        return torch.optim.SGD(params.values(), lr=cfg.outer_lr)
    return torch.optim.Adam(params.values(), lr=cfg.outer_lr)


def outer_lr_at(cfg: ResolvedConfig, iteration: int, train_seconds: float) -> float:
    """The outer learning rate of meta-step ``iteration`` (0-based), ``train_seconds`` of meta-steps into the run:
    ``cfg.outer_lr``, or with ``outer_lr_schedule="linear"`` that times the fraction of the run left (of
    ``time_budget`` seconds when a budget is set, else of ``iterations``), as Reptile anneals its step size to 0.

    Example:
        >>> cfg = resolve_config(TrainConfig(outer_lr=1.0, iterations=4, outer_lr_schedule="linear"))
        >>> [outer_lr_at(cfg, i, 0.0) for i in range(4)]
        [1.0, 0.75, 0.5, 0.25]
        >>> budget = resolve_config(TrainConfig(outer_lr=1.0, time_budget=60.0, outer_lr_schedule="linear"))
        >>> outer_lr_at(budget, 0, 15.0), outer_lr_at(budget, 9, 75.0)   # a quarter spent; past the budget
        (0.75, 0.0)
    """
    if cfg.outer_lr_schedule == "constant":
        return cfg.outer_lr
    done = train_seconds / cfg.time_budget if cfg.time_budget is not None else iteration / cfg.iterations
    return cfg.outer_lr * max(0.0, 1.0 - done)


_OLD_CHECKPOINT_DEFAULTS = {"outer_optimizer": "adam", "outer_lr_schedule": "constant"}
# Settings added after checkpoints were first written: a checkpoint without them was trained with these.


def restore_checkpoint(checkpoint: dict[str, Any], cfg: ResolvedConfig, params: Params,
                       optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int:
    """Load a :func:`checkpoint_state` into live objects (checking it fits) and return its iteration.

    Example:
        >>> p = {"w": torch.zeros(2, requires_grad=True)}
        >>> opt, g = torch.optim.Adam(p.values()), torch.Generator()
        >>> restore_checkpoint(checkpoint_state(TrainConfig(), 7, p, opt, g, [], 0.0), TrainConfig(), p, opt, g)
        7
    """
    checkpoint = {**checkpoint, "config": {**_OLD_CHECKPOINT_DEFAULTS, **(checkpoint.get("config") or {})}}
    check_compatible(checkpoint, params, config=cfg.to_dict(), keys=RESUME_KEYS, caller="train --resume")
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(checkpoint["params"][k].to(v.device))
    optimizer.load_state_dict(checkpoint["optimizer"])
    rng = checkpoint.get("rng", {})
    generator.set_state(rng["tasks"])
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    return int(checkpoint["iteration"])


def _read_records(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    keep = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("iteration", 0) <= upto:
                keep.append(rec)
    return keep


def _validate(exp: Experiment, cfg: ResolvedConfig, params: Params, iteration: int) -> dict[str, Any]:
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1_000_003)
    res = evaluate_episodes(exp.learner, params, exp.sources["val"], episodes=cfg.val_episodes,
                            steps=cfg.eval_inner_steps, classification=exp.classification, generator=gen,
                            batch=min(cfg.meta_batch, cfg.val_episodes), mode=cfg.mode)
    return {"iteration": iteration, "split": "val", res.metric: res.mean, f"{res.metric}_ci95": res.ci95,
            "inner_steps": res.steps, "episodes": res.episodes}


def train(config: TrainConfig, *, resume: bool | str | os.PathLike = False,
          is_main: bool | None = None, progress: bool = True,
          stop_after: int | None = None,
          train_source: Callable[[TaskSource], TaskSource] | None = None,
          wrap_step: Callable[[MetaStep], MetaStep] | None = None,
          sync_flag: Callable[..., tuple[bool, ...]] | None = None,
          barrier: Callable[[], None] | None = None) -> TrainResult:
    """Meta-train ``config.algorithm`` on ``config.dataset`` with Adam(``outer_lr``) (or the optimizer and schedule
    of ``outer_optimizer`` and ``outer_lr_schedule``) for ``config.iterations``.

    Writes to ``config.out`` (main process only): ``config.json``, ``metrics.jsonl`` (one JSON record per
    iteration, ``"split": "train"``, and per validation, ``"split": "val"``), ``checkpoint.pt`` (atomically, every
    ``checkpoint_every`` iterations and at the end) and ``learning_curve.png``. ``resume=True`` continues from
    ``OUT/checkpoint.pt`` (or the path given): parameters, optimizer and generator states are restored, so the
    result equals an uninterrupted run bit for bit. ``stop_after`` ends the run early after that many iterations
    (as if interrupted; used to test resuming). ``train_source`` wraps the training task source: a distributed run
    passes ``lambda src: metafunc.distributed.ShardedSource(src, rank=r, world_size=n)`` so that each rank draws
    only its share of every meta-batch, and ``wrap_step=metafunc.distributed.sharded`` so that every rank's step
    returns the whole meta-batch's meta-gradient. Each iteration takes one :func:`trainer_step`. Under ``torchrun``
    ``sync_flag(*flags) -> flags`` (each true if it is on any rank) makes every rank stop at the same step after a
    signal or when the time budget runs out on any rank,
    and ``barrier()`` holds the other ranks until rank 0 has written that checkpoint.

    Failures (see the module's docstring): :class:`NonFiniteError` (nothing of the bad step applied, the last
    checkpoint kept), :class:`Preempted` (a checkpoint written at the step it stopped),
    :class:`metafunc.train.checkpoint.CheckpointError` (the previous checkpoint intact). Each skipped step (with
    ``on_nonfinite="skip"``) is logged as ``{"iteration": i, "split": "train", "skipped": "nonfinite", "quantity":
    ..., "objective": null}``; in ``metrics.jsonl`` a non-finite number is always written as ``null``. ``config.threads`` is applied by the ``metafunc`` command, not here
    (a library call leaves torch's thread count alone).

    Example:
        >>> import tempfile
        >>> cfg = TrainConfig(dataset="synthetic", iterations=2, out=tempfile.mkdtemp())
        >>> result = train(cfg, progress=False)
        >>> result.records[-1]["iteration"]
        2
    """
    cfg = resolve_config(config)
    if sync_flag is not None and cfg.outer_lr_schedule == "linear" and cfg.time_budget is not None:
        # each rank measures its own seconds, so a schedule over the budget would give the ranks different steps
        raise ValueError("train: --outer-lr-schedule linear with --time-budget anneals by each process's own clock, "
                         "so the processes of a distributed run would step differently; pass --iterations and no "
                         "--time-budget to anneal over iterations")
    if is_main is None:
        is_main = default_is_main()
    out = Path(cfg.out)
    exp = build_experiment(cfg)
    if train_source is not None:
        exp = exp._replace(sources={**exp.sources, "train": train_source(exp.sources["train"])})
    params = exp.params
    optimizer = outer_optimizer(cfg, params)
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    start, seconds, train_seconds = 0, 0.0, 0.0
    records: list[dict[str, Any]] = []
    if resume:
        path = out / "checkpoint.pt" if resume is True else Path(resume)
        ckpt = load_checkpoint(path)
        start = restore_checkpoint(ckpt, cfg, params, optimizer, generator)
        seconds = float(ckpt.get("seconds", 0.0))
        train_seconds = float(ckpt.get("train_seconds", 0.0))
        records = _read_records(out / "metrics.jsonl", start)
        if start >= cfg.iterations:
            raise ValueError(f"train: the checkpoint {str(path)!r} has already done {start} iterations; pass "
                             f"--iterations larger than {start} to continue")
        if cfg.time_budget is not None and train_seconds >= cfg.time_budget:
            raise ValueError(f"train: the checkpoint {str(path)!r} has already spent {train_seconds:.1f} s of its "
                             f"{cfg.time_budget:g} s budget; pass a larger --time-budget to continue")
    metrics_file = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", strict_json(cfg.to_dict(), indent=2) + "\n")
        atomic_write_text(out / "metrics.jsonl", "".join(strict_json(r) + "\n" for r in records))
        metrics_file = open(out / "metrics.jsonl", "a")
    step = trainer_step(exp, cfg)
    if wrap_step is not None:
        step = wrap_step(step)
    end = cfg.iterations if stop_after is None else min(cfg.iterations, start + stop_after)
    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=None if cfg.time_budget is not None else cfg.iterations, initial=start,
                   desc=f"{cfg.algorithm} {cfg.dataset}", dynamic_ncols=True)
    t0 = time.perf_counter()
    last_val: dict[str, Any] | None = next((r for r in reversed(records) if r.get("split") == "val"), None)
    ckpt_path = out / "checkpoint.pt"
    last_good: tuple[str, int] | None = (str(path), start) if resume else None
    skipped = 0

    def write_checkpoint(done: int) -> None:
        nonlocal last_good
        save_checkpoint(ckpt_path, checkpoint_state(cfg, done, params, optimizer, generator, records,
                                                    seconds + time.perf_counter() - t0, train_seconds))
        last_good = (str(ckpt_path), done)

    def log(record: dict[str, Any]) -> None:
        records.append(record)
        if metrics_file is not None:
            metrics_file.write(strict_json(record) + "\n")

    with _StopSignals() as signals:
        try:
            for it in range(start, end):
                done = it + 1
                before_step = generator.get_state()   # to save the state after iteration ``it`` if this step is bad
                tasks = exp.sources["train"].sample(cfg.meta_batch, generator)
                step_start = time.perf_counter()
                objective, metrics, grads = step(params, tasks)
                bad = nonfinite_quantity(objective, grads)   # a host sync: the step's time is all counted
                rec: dict[str, Any] = {"iteration": done, "split": "train", "objective": float(objective)}
                rec.update({k: float(v) for k, v in metrics.items()})
                if bad is None:
                    apply_grads(params, grads)
                    if cfg.outer_lr_schedule != "constant":
                        for group in optimizer.param_groups:
                            group["lr"] = outer_lr_at(cfg, it, train_seconds)
                    optimizer.step()
                    train_seconds += time.perf_counter() - step_start
                else:
                    if cfg.on_nonfinite == "stop" or skipped >= cfg.max_nonfinite:
                        if is_main and it > (last_good[1] if last_good else start - 1) and it > 0:
                            generator.set_state(before_step)   # the state after iteration ``it``, all finite
                            write_checkpoint(it)
                        kept = (f"the last good state (iteration {last_good[1]}) is in {last_good[0]}" if last_good
                                else "no checkpoint was written (no step was applied)")
                        why = ("the run stopped" if cfg.on_nonfinite == "stop" else
                               f"{skipped} non-finite steps were skipped already (--max-nonfinite {cfg.max_nonfinite})")
                        if metrics_file is not None:
                            metrics_file.flush()
                        if barrier is not None:
                            barrier()   # every rank saw the same all-reduced values; wait for rank 0's checkpoint
                        raise NonFiniteError(
                            f"train: the {bad} is not finite at iteration {done}; the step was not applied and {why}. "
                            f"{kept.capitalize()}. Lower --outer-lr or --inner-lr (now {cfg.outer_lr:g} and "
                            f"{cfg.inner_lr:g}), or pass --on-nonfinite skip to skip such steps",
                            iteration=done, checkpoint=last_good[0] if last_good else None)
                    skipped += 1
                    rec.update({"skipped": "nonfinite", "quantity": bad})
                    if bar is not None:
                        bar.write(f"train: iteration {done}: the {bad} is not finite; step skipped "
                                  f"({skipped} of at most {cfg.max_nonfinite})")
                rec["train_seconds"] = round(train_seconds, 4)
                log(rec)
                out_of_time = cfg.time_budget is not None and train_seconds >= cfg.time_budget
                stop = signals.received is not None
                if sync_flag is not None:   # one small all-reduce a step: a signal or the budget on any rank stops all
                    stop, out_of_time = sync_flag(stop, out_of_time)
                final = done == end or out_of_time
                if is_main and ((cfg.val_every and done % cfg.val_every == 0) or done == cfg.iterations or out_of_time):
                    last_val = {**_validate(exp, cfg, params, done), "train_seconds": round(train_seconds, 4)}
                    log(last_val)
                if metrics_file is not None:
                    metrics_file.flush()
                if bar is not None:
                    post = {"loss": f"{rec.get('loss', rec['objective']):.3f}"}
                    if "accuracy" in rec:
                        post["acc"] = f"{rec['accuracy']:.3f}"
                    if last_val is not None:
                        key = "accuracy" if exp.classification else "mse"
                        post[f"val_{key}"] = f"{last_val[key]:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                periodic = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or final
                if is_main and (periodic or stop):
                    write_checkpoint(done)
                if out_of_time:
                    end = done
                    break
                if stop and done < end:
                    if barrier is not None:
                        barrier()   # the other ranks wait until rank 0's checkpoint is on disk
                    name = signal.Signals(signals.received).name if signals.received is not None else "another rank"
                    raise Preempted(f"train: stopped by {name} after iteration {done} of {cfg.iterations}; "
                                    f"checkpoint {ckpt_path} written; continue with --resume",
                                    iteration=done, checkpoint=str(ckpt_path))
        finally:
            if bar is not None:
                bar.close()
            if metrics_file is not None:
                metrics_file.close()
    seconds += time.perf_counter() - t0
    finished = end == cfg.iterations or (cfg.time_budget is not None and train_seconds >= cfg.time_budget)
    if is_main and finished:
        plot_learning_curve(records, out / "learning_curve.png", title=f"{cfg.algorithm} on {cfg.dataset}")
    return TrainResult(params, records, out, cfg, exp, seconds, train_seconds)
