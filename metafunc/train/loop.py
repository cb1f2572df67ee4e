"""``train(config)``: the run behind ``metafunc train``, composed from :func:`metafunc.train.fit` and its callbacks.

The pieces, each replaceable:

* a **task source**: anything with ``sample(meta_batch, generator) -> Task`` (``metafunc.data.SinusoidSource``,
  ``GaussianClassification``, ``EpisodeSampler``, or a user's own through :data:`metafunc.data.DATASETS`);
* a **learner** from the registry (:data:`metafunc.LEARNERS`, ``config.algorithm``);
* the **meta-step** :func:`metafunc.meta_value_and_grad`, the same default step a user gets from the README, which a
  distributed run wraps with ``wrap_step=metafunc.distributed.sharded``;
* the **loop** :func:`metafunc.train.fit` with its callbacks (:mod:`metafunc.train.callbacks`);
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
  :class:`metafunc.train.checkpoint.CheckpointError` (:data:`EXIT_CHECKPOINT`);
* a folder that already holds a run is never written into unless the run is told to ``resume`` or ``overwrite`` it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from metafunc._shared import atomic_write_text, strict_json
from metafunc.algorithms import MetaLearner
from metafunc.core.types import Params
from metafunc.registry import LEARNERS
from metafunc.step import MetaStep, meta_value_and_grad
from metafunc.step.plan import StepPlan
from metafunc.train.callbacks import (
    STOP_SIGNALS,
    AgreeAcrossRanks,
    Barrier,
    Checkpointer,
    EpochSchedule,
    MetricsLog,
    ProgressBar,
    StopOnSignal,
    Validation,
)
from metafunc.train.checkpoint import check_compatible, load_checkpoint
from metafunc.train.config import RESUME_KEYS, ResolvedConfig, TrainConfig, resolve_config
from metafunc.train.evaluation import TaskSource, evaluate_episodes
from metafunc.train.experiment import Experiment, build_experiment, learner_options
from metafunc.train.fit import FitState, NonFiniteError, Preempted, fit, nonfinite_quantity
from metafunc.train.plots import plot_learning_curve

__all__ = ["TrainResult", "train", "default_is_main", "checkpoint_state", "restore_checkpoint", "trainer_step",
           "NonFiniteError", "Preempted", "EXIT_NONFINITE", "EXIT_PREEMPTED", "EXIT_CHECKPOINT", "STOP_SIGNALS",
           "nonfinite_quantity", "outer_optimizer", "outer_lr_at", "run_fraction", "COSINE_FLOOR", "RUN_FILES",
           "run_callbacks", "EpochAnnealedStep", "measured_plan", "PLAN_PROBE_LIMIT"]

PLAN_PROBE_LIMIT = 40
"""At most this many probe meta-steps measure a ``mode="auto"`` run's plan before it starts."""

EXIT_NONFINITE = 3
"""``metafunc train``'s exit status when the meta-loss or meta-gradient stopped being finite."""
EXIT_CHECKPOINT = 4
"""``metafunc train``'s exit status when a checkpoint could not be written (the previous one is intact)."""
EXIT_PREEMPTED = 75
"""``metafunc train``'s exit status after a stop signal: a checkpoint was written; restart with ``--resume``
(75 is ``EX_TEMPFAIL``: a temporary failure, try again)."""
RUN_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "config.json", "learning_curve.png")
"""The files a run writes into its ``out`` folder; ``overwrite=True`` removes them before a new run starts."""


class EpochAnnealedStep:
    """The meta-step of a learner that is a function of the training epoch (MAML++'s annealed multi-step loss and
    derivative order): ``build(epoch) -> MetaStep``, rebuilt when :meth:`set_epoch` moves to another epoch.

    Example:
        >>> built = []
        >>> step = EpochAnnealedStep(lambda epoch: built.append(epoch) or (lambda params, tasks: epoch))
        >>> step.set_epoch(0); step.set_epoch(2); step(None, None), built
        (2, [0, 2])
    """

    def __init__(self, build: Callable[[int], MetaStep]) -> None:
        self.build, self.epoch = build, -1
        self.step: MetaStep | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.step, self.epoch = self.build(epoch), epoch

    def __call__(self, params: Params, tasks: Any) -> Any:
        if self.step is None:   # never told an epoch: the first
            self.set_epoch(0)
        return self.step(params, tasks)  # type: ignore[misc]


def measured_plan(exp: Experiment, cfg: ResolvedConfig, source: TaskSource) -> StepPlan | None:
    """The plan a ``mode="auto"`` run trains with, measured once before it starts (``None`` for a fixed mode):
    :func:`metafunc.meta_value_and_grad`'s candidates timed on a probe meta-batch drawn from a generator of its own,
    with torch's RNG state put back, so the run's draws are those of any other plan. The checkpoint keeps it, and a
    resumed run continues with it (bit for bit).

    Example:
        >>> cfg = resolve_config(TrainConfig(dataset="synthetic", width=8, meta_batch=4))
        >>> exp = build_experiment(cfg)
        >>> measured_plan(exp, cfg, exp.sources["train"]).mode in ("loop", "vmap")
        True
    """
    if cfg.mode != "auto":
        return None
    probe = source.sample(cfg.meta_batch, torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1_000_003))
    step = meta_value_and_grad(exp.learner, chunk_size=cfg.chunk_size, workers=cfg.workers,  # type: ignore[arg-type]
                               channels_last=cfg.channels_last)
    with torch.random.fork_rng(devices=[]):
        for _ in range(PLAN_PROBE_LIMIT):
            step(exp.params, probe)
            if step.planner.plan() is not None:  # type: ignore[attr-defined]
                return step.planner.plan()  # type: ignore[attr-defined,no-any-return]
    return step.plan  # type: ignore[attr-defined,no-any-return]  # pragma: no cover - more candidates than the limit


def trainer_step(exp: Experiment, cfg: ResolvedConfig, plan: StepPlan | None = None) -> MetaStep:
    """The meta-step ``metafunc train`` takes: :func:`metafunc.meta_value_and_grad` of the run's learner with the
    run's ``mode``, ``chunk_size``, ``workers`` and ``channels_last``, or the ``plan`` measured for a ``mode="auto"``
    run (:func:`measured_plan`, which keeps those the run fixes);
    for a learner whose factory takes ``epoch`` (MAML++), an :class:`EpochAnnealedStep` that the trainer moves
    every ``epoch_length`` iterations.

    Example:
        >>> exp = build_experiment(resolve_config(TrainConfig(dataset="synthetic", width=8)))
        >>> step = trainer_step(exp, resolve_config(TrainConfig(dataset="synthetic", width=8)))
        >>> loss, metrics, grads = step(exp.params, exp.sources["train"].sample(4, torch.Generator().manual_seed(0)))
        >>> sorted(grads) == sorted(exp.params)
        True
    """
    spec = LEARNERS[cfg.algorithm]
    how: dict[str, Any] = {"mode": cfg.mode, "chunk_size": cfg.chunk_size, "workers": cfg.workers,
                           "channels_last": cfg.channels_last} if plan is None else {
        "mode": plan.mode, "chunk_size": plan.chunk_size, "workers": plan.workers if plan.mode == "loop" else None,
        "channels_last": plan.channels_last}
    if not spec.accepts("epoch"):
        return meta_value_and_grad(exp.learner, **how)  # type: ignore[arg-type]
    return EpochAnnealedStep(lambda epoch: meta_value_and_grad(  # type: ignore[arg-type]
        spec.build(exp.model, **{**learner_options(cfg), "epoch": epoch}), **how))


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
    plan: StepPlan | None = None
    """How the meta-batches ran, measured for ``mode="auto"`` (:func:`measured_plan`); ``None`` for a fixed mode."""


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


def run_fraction(cfg: ResolvedConfig, iteration: int, train_seconds: float) -> float:
    """How much of the run is done before meta-step ``iteration`` (0-based): of ``time_budget`` seconds of meta-steps
    when a budget is set, else of ``iterations``; in ``[0, 1]``. The schedules (and anything annealed over a run)
    read it.

    Example:
        >>> run_fraction(resolve_config(TrainConfig(iterations=4)), 1, 0.0)
        0.25
    """
    done = train_seconds / cfg.time_budget if cfg.time_budget is not None else iteration / cfg.iterations
    return min(1.0, max(0.0, done))


COSINE_FLOOR = 0.01
"""The cosine schedule anneals ``outer_lr`` to ``COSINE_FLOOR * outer_lr`` (MAML++'s configs: 1e-3 to 1e-5)."""


def outer_lr_at(cfg: ResolvedConfig, iteration: int, train_seconds: float) -> float:
    """The outer learning rate of meta-step ``iteration`` (0-based), ``train_seconds`` of meta-steps into the run:
    ``cfg.outer_lr``; with ``outer_lr_schedule="linear"`` that times the fraction of the run left, as Reptile anneals
    its step size to 0; with ``"cosine"`` annealed along half a cosine to ``COSINE_FLOOR * outer_lr`` (MAML++'s
    cosine annealing of the meta learning rate). The fraction is :func:`run_fraction`'s.

    Example:
        >>> cfg = resolve_config(TrainConfig(outer_lr=1.0, iterations=4, outer_lr_schedule="linear"))
        >>> [outer_lr_at(cfg, i, 0.0) for i in range(4)]
        [1.0, 0.75, 0.5, 0.25]
        >>> budget = resolve_config(TrainConfig(outer_lr=1.0, time_budget=60.0, outer_lr_schedule="linear"))
        >>> outer_lr_at(budget, 0, 15.0), outer_lr_at(budget, 9, 75.0)   # a quarter spent; past the budget
        (0.75, 0.0)
        >>> cosine = resolve_config(TrainConfig(outer_lr=1.0, iterations=4, outer_lr_schedule="cosine"))
        >>> [round(outer_lr_at(cosine, i, 0.0), 4) for i in range(4)]
        [1.0, 0.855, 0.505, 0.155]
    """
    done = run_fraction(cfg, iteration, train_seconds)
    if cfg.outer_lr_schedule == "linear":
        return cfg.outer_lr * (1.0 - done)
    if cfg.outer_lr_schedule == "cosine":
        floor = COSINE_FLOOR * cfg.outer_lr
        return floor + (cfg.outer_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * done))
    return cfg.outer_lr


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


def _validator(exp: Experiment, cfg: ResolvedConfig) -> Callable[[Params], dict[str, Any]]:
    """Validation episodes (the same ones every time: a fixed seed) at ``cfg.eval_inner_steps``, with the learner
    rebuilt for the validation split's ways when they differ from the training ways (``--val-ways``)."""
    learner: list[MetaLearner] = []

    def evaluate(params: Params) -> dict[str, Any]:
        source = exp.sources["val"]   # built on first use: a split that cannot hold --ways never caps training
        if not learner:
            ways = getattr(source, "ways", cfg.ways)
            spec = LEARNERS[cfg.algorithm]
            rebuild = ways != cfg.ways and spec.accepts("ways")
            learner.append(spec.build(exp.model, **{**learner_options(cfg), "ways": ways}) if rebuild
                           else exp.learner)
        gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1_000_003)
        res = evaluate_episodes(learner[0], params, source, episodes=cfg.val_episodes,
                                steps=cfg.eval_inner_steps, classification=exp.classification, generator=gen,
                                batch=min(cfg.meta_batch, cfg.val_episodes), mode=cfg.mode)
        return {res.metric: res.mean, f"{res.metric}_ci95": res.ci95, "inner_steps": res.steps,
                "episodes": res.episodes, "ways": getattr(source, "ways", cfg.ways)}
    return evaluate


def _refuse_existing_run(out: Path, overwrite: bool) -> None:
    """A folder holding a run is replaced only when asked (``overwrite``); otherwise a clear error, nothing lost."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return
    if not overwrite:
        done = ""
        if (out / "checkpoint.pt").exists():
            done = f" (its checkpoint is at iteration {int(load_checkpoint(out / 'checkpoint.pt')['iteration'])})"
        raise ValueError(f"train: the output folder {str(out)!r} already holds a run{done}: {', '.join(found)}. "
                         "Pass --resume to continue it, --overwrite to replace it, or another --out")
    for name in found:
        (out / name).unlink()


def _initial_state(cfg: ResolvedConfig, params: Params, resume: bool | str | os.PathLike, out: Path,
                   stop_after: int | None) -> FitState:
    """A fresh :class:`FitState`, or the one a checkpoint holds (parameters, optimizer, generators, records)."""
    state = FitState(params=params, optimizer=outer_optimizer(cfg, params),
                     generator=torch.Generator(device=cfg.device).manual_seed(cfg.seed), iterations=cfg.iterations)
    torch.manual_seed(cfg.seed)
    if resume:
        path = out / "checkpoint.pt" if resume is True else Path(resume)
        ckpt = load_checkpoint(path)
        state.iteration = restore_checkpoint(ckpt, cfg, params, state.optimizer, state.generator)
        state.train_seconds = float(ckpt.get("train_seconds", 0.0))
        state.records = _read_records(out / "metrics.jsonl", state.iteration)
        state.last_val = next((r for r in reversed(state.records) if r.get("split") == "val"), None)
        state.checkpoint = (str(path), state.iteration)
        if state.iteration >= cfg.iterations:
            raise ValueError(f"train: the checkpoint {str(path)!r} has already done {state.iteration} iterations; "
                             f"pass --iterations larger than {state.iteration} to continue")
        if cfg.time_budget is not None and state.train_seconds >= cfg.time_budget:
            raise ValueError(f"train: the checkpoint {str(path)!r} has already spent {state.train_seconds:.1f} s of "
                             f"its {cfg.time_budget:g} s budget; pass a larger --time-budget to continue")
    if stop_after is not None:
        state.iterations = min(cfg.iterations, state.iteration + stop_after)
    return state


def run_callbacks(cfg: ResolvedConfig, exp: Experiment, out: Path, *, is_main: bool, progress: bool,
                  sync_flag: Callable[..., tuple[bool, ...]] | None = None, barrier: Callable[[], None] | None = None,
                  seconds_before: float = 0.0, initial: int = 0, plan: StepPlan | None = None) -> list[Any]:
    """The callbacks of a ``metafunc train`` run, in their order: stop signals, agreement across ranks, then (main
    process only) validation, ``metrics.jsonl``, the progress bar and checkpoints (with the measured ``plan``),
    and last the barrier.

    Example:
        >>> cfg = resolve_config(TrainConfig(dataset="synthetic", width=8))
        >>> [type(c).__name__ for c in run_callbacks(cfg, build_experiment(cfg), Path("/tmp/x"), is_main=True,
        ...                                          progress=False)]
        ['StopOnSignal', 'Validation', 'MetricsLog', 'Checkpointer']
    """
    t0 = time.perf_counter()

    def make_state(state: FitState, iteration: int) -> dict[str, Any]:
        saved = checkpoint_state(cfg, iteration, state.params, state.optimizer, state.generator, state.records,
                                 seconds_before + time.perf_counter() - t0, state.train_seconds)
        return saved if plan is None else {**saved, "plan": plan._asdict()}

    callbacks: list[Any] = [StopOnSignal()]
    if sync_flag is not None:
        callbacks.append(AgreeAcrossRanks(sync_flag))
    if is_main:
        callbacks += [Validation(_validator(exp, cfg), every=cfg.val_every, at=cfg.iterations),
                      MetricsLog(out / "metrics.jsonl")]
        if progress:
            callbacks.append(ProgressBar(total=None if cfg.time_budget is not None else cfg.iterations,
                                         initial=initial, desc=f"{cfg.algorithm} {cfg.dataset}",
                                         metric="accuracy" if exp.classification else "mse"))
        callbacks.append(Checkpointer(out / "checkpoint.pt", every=cfg.checkpoint_every, make_state=make_state))
    if barrier is not None:
        callbacks.append(Barrier(barrier))
    return callbacks


def train(config: TrainConfig, *, resume: bool | str | os.PathLike = False, overwrite: bool = False,
          is_main: bool | None = None, progress: bool = True, stop_after: int | None = None,
          train_source: Callable[[TaskSource], TaskSource] | None = None,
          wrap_step: Callable[[MetaStep], MetaStep] | None = None,
          sync_flag: Callable[..., tuple[bool, ...]] | None = None,
          barrier: Callable[[], None] | None = None) -> TrainResult:
    """Meta-train ``config.algorithm`` on ``config.dataset`` with the outer optimizer and schedule of the config, for
    ``config.iterations`` (or ``config.time_budget`` seconds of meta-steps): :func:`metafunc.train.fit` with the
    callbacks of :func:`run_callbacks`.

    Writes to ``config.out`` (main process only): ``config.json``, ``metrics.jsonl`` (one JSON record per iteration,
    ``"split": "train"``, and per validation, ``"split": "val"``; a non-finite number as ``null``), ``checkpoint.pt``
    (atomically, every ``checkpoint_every`` iterations, at the end and on a stop signal; the previous one kept as
    ``checkpoint.prev.pt``) and ``learning_curve.png``. A folder that holds a run already is refused unless
    ``resume`` (continue from ``OUT/checkpoint.pt`` or the path given, bit for bit) or ``overwrite`` (remove its
    files first). ``stop_after`` ends the run after that many iterations, as if interrupted. A distributed run
    passes ``train_source`` (each rank draws its share), ``wrap_step=metafunc.distributed.sharded``, ``sync_flag``
    (every rank stops at the same step) and ``barrier`` (the ranks wait for rank 0's checkpoint). Raises
    :class:`NonFiniteError`, :class:`Preempted` or :class:`~metafunc.train.checkpoint.CheckpointError` as the
    module's docstring says. ``config.threads`` is applied by the ``metafunc`` command, not here.

    Example:
        >>> import tempfile
        >>> cfg = TrainConfig(dataset="synthetic", iterations=2, out=tempfile.mkdtemp())
        >>> result = train(cfg, progress=False)
        >>> result.records[-1]["iteration"]
        2
    """
    cfg = config if isinstance(config, ResolvedConfig) else resolve_config(config)
    if sync_flag is not None and cfg.outer_lr_schedule != "constant" and cfg.time_budget is not None:
        # each rank measures its own seconds, so a schedule over the budget would give the ranks different steps
        raise ValueError(f"train: --outer-lr-schedule {cfg.outer_lr_schedule} with --time-budget anneals by each "
                         "process's own clock, "
                         "so the processes of a distributed run would step differently; pass --iterations and no "
                         "--time-budget to anneal over iterations")
    is_main = default_is_main() if is_main is None else is_main
    out = Path(cfg.out)
    if is_main and not resume:
        _refuse_existing_run(out, overwrite)
    exp = build_experiment(cfg)
    source = exp.sources["train"] if train_source is None else train_source(exp.sources["train"])
    state = _initial_state(cfg, exp.params, resume, out, stop_after)
    seconds = float(load_checkpoint(state.checkpoint[0]).get("seconds", 0.0)) if resume and state.checkpoint else 0.0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", strict_json(cfg.to_dict(), indent=2) + "\n")
    saved_plan = load_checkpoint(state.checkpoint[0]).get("plan") if resume and state.checkpoint else None
    plan = StepPlan(**saved_plan) if saved_plan else measured_plan(exp, cfg, source)
    step = trainer_step(exp, cfg, plan)
    epochs = [EpochSchedule(step, every=cfg.epoch_length)] if isinstance(step, EpochAnnealedStep) else []
    t0 = time.perf_counter()
    fit(step if wrap_step is None else wrap_step(step), source, state, meta_batch=cfg.meta_batch,
        time_budget=cfg.time_budget, callbacks=epochs + run_callbacks(
            cfg, exp, out, is_main=is_main, progress=progress, sync_flag=sync_flag, barrier=barrier,
            seconds_before=seconds, initial=state.iteration, plan=plan),
        lr_at=None if cfg.outer_lr_schedule == "constant" else lambda it, secs: outer_lr_at(cfg, it, secs),
        on_nonfinite=cfg.on_nonfinite, max_nonfinite=cfg.max_nonfinite,  # type: ignore[arg-type]
        nonfinite_advice=f"Lower --outer-lr or --inner-lr (now {cfg.outer_lr:g} and {cfg.inner_lr:g}), or pass "
                         "--on-nonfinite skip to skip such steps")
    seconds += time.perf_counter() - t0
    if is_main and (state.iteration == cfg.iterations or state.stop == "budget"):
        plot_learning_curve(state.records, out / "learning_curve.png", title=f"{cfg.algorithm} on {cfg.dataset}")
    return TrainResult(state.params, state.records, out, cfg, exp, seconds, state.train_seconds, plan)
