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
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from metafunc._shared import atomic_write_text
from metafunc.core.types import Params
from metafunc.step import MetaStep, apply_grads, meta_value_and_grad
from metafunc.train.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from metafunc.train.config import RESUME_KEYS, ResolvedConfig, TrainConfig, resolve_config
from metafunc.train.evaluation import TaskSource, evaluate_episodes
from metafunc.train.experiment import Experiment, build_experiment
from metafunc.train.plots import plot_learning_curve

__all__ = ["TrainResult", "train", "default_is_main", "checkpoint_state", "restore_checkpoint", "trainer_step"]


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


def checkpoint_state(cfg: ResolvedConfig, iteration: int, params: Params, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
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
    }


def restore_checkpoint(checkpoint: dict[str, Any], cfg: ResolvedConfig, params: Params,
                       optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int:
    """Load a :func:`checkpoint_state` into live objects (checking it fits) and return its iteration.

    Example:
        >>> p = {"w": torch.zeros(2, requires_grad=True)}
        >>> opt, g = torch.optim.Adam(p.values()), torch.Generator()
        >>> restore_checkpoint(checkpoint_state(TrainConfig(), 7, p, opt, g, [], 0.0), TrainConfig(), p, opt, g)
        7
    """
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
          wrap_step: Callable[[MetaStep], MetaStep] | None = None) -> TrainResult:
    """Meta-train ``config.algorithm`` on ``config.dataset`` with Adam(``outer_lr``) for ``config.iterations``.

    Writes to ``config.out`` (main process only): ``config.json``, ``metrics.jsonl`` (one JSON record per
    iteration, ``"split": "train"``, and per validation, ``"split": "val"``), ``checkpoint.pt`` (atomically, every
    ``checkpoint_every`` iterations and at the end) and ``learning_curve.png``. ``resume=True`` continues from
    ``OUT/checkpoint.pt`` (or the path given): parameters, optimizer and generator states are restored, so the
    result equals an uninterrupted run bit for bit. ``stop_after`` ends the run early after that many iterations
    (as if interrupted; used to test resuming). ``train_source`` wraps the training task source: a distributed run
    passes ``lambda src: metafunc.distributed.ShardedSource(src, rank=r, world_size=n)`` so that each rank draws
    only its share of every meta-batch, and ``wrap_step=metafunc.distributed.sharded`` so that every rank's step
    returns the whole meta-batch's meta-gradient. Each iteration takes one :func:`trainer_step`. ``config.threads`` is applied by the ``metafunc`` command, not here
    (a library call leaves torch's thread count alone).

    Example:
        >>> import tempfile
        >>> cfg = TrainConfig(dataset="synthetic", iterations=2, out=tempfile.mkdtemp())
        >>> result = train(cfg, progress=False)
        >>> result.records[-1]["iteration"]
        2
    """
    cfg = resolve_config(config)
    if is_main is None:
        is_main = default_is_main()
    out = Path(cfg.out)
    exp = build_experiment(cfg)
    if train_source is not None:
        exp = exp._replace(sources={**exp.sources, "train": train_source(exp.sources["train"])})
    params = exp.params
    optimizer = torch.optim.Adam(params.values(), lr=cfg.outer_lr)
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    start, seconds = 0, 0.0
    records: list[dict[str, Any]] = []
    if resume:
        path = out / "checkpoint.pt" if resume is True else Path(resume)
        ckpt = load_checkpoint(path)
        start = restore_checkpoint(ckpt, cfg, params, optimizer, generator)
        seconds = float(ckpt.get("seconds", 0.0))
        records = _read_records(out / "metrics.jsonl", start)
        if start >= cfg.iterations:
            raise ValueError(f"train: the checkpoint {str(path)!r} has already done {start} iterations; pass "
                             f"--iterations larger than {start} to continue")
    metrics_file = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        metrics_file = open(out / "metrics.jsonl", "a")
    step = trainer_step(exp, cfg)
    if wrap_step is not None:
        step = wrap_step(step)
    end = cfg.iterations if stop_after is None else min(cfg.iterations, start + stop_after)
    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.iterations, initial=start, desc=f"{cfg.algorithm} {cfg.dataset}", dynamic_ncols=True)
    t0 = time.perf_counter()
    last_val: dict[str, Any] | None = next((r for r in reversed(records) if r.get("split") == "val"), None)
    try:
        for it in range(start, end):
            tasks = exp.sources["train"].sample(cfg.meta_batch, generator)
            objective, metrics, grads = step(params, tasks)
            apply_grads(params, grads)
            optimizer.step()
            rec: dict[str, Any] = {"iteration": it + 1, "split": "train", "objective": float(objective)}
            rec.update({k: float(v) for k, v in metrics.items()})
            records.append(rec)
            if metrics_file is not None:
                metrics_file.write(json.dumps(rec) + "\n")
            done = it + 1
            if is_main and ((cfg.val_every and done % cfg.val_every == 0) or done == cfg.iterations):
                last_val = _validate(exp, cfg, params, done)
                records.append(last_val)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(last_val) + "\n")
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
            if is_main and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == end):
                save_checkpoint(out / "checkpoint.pt", checkpoint_state(
                    cfg, done, params, optimizer, generator, records, seconds + time.perf_counter() - t0))
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
    seconds += time.perf_counter() - t0
    if is_main and end == cfg.iterations:
        plot_learning_curve(records, out / "learning_curve.png", title=f"{cfg.algorithm} on {cfg.dataset}")
    return TrainResult(params, records, out, cfg, exp, seconds)
