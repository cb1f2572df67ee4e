"""``metafunc train``: meta-train a registered learner (the default: MAML on sinusoid regression against a
pretrained baseline), on one process or under ``torchrun``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from metafunc import distributed
from metafunc.cli.options import train_config_from_args
from metafunc.registry import LEARNERS
from metafunc.train import (
    EXIT_CHECKPOINT,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    CheckpointError,
    NonFiniteError,
    Preempted,
    ResolvedConfig,
    TrainResult,
    default_is_main,
    load_checkpoint,
    resolve_config,
    train,
)
from metafunc.train.sinusoid_baseline import compare_with_baseline
from metafunc.train.torchrun import join_torchrun

__all__ = ["run_train"]


def _config(args: argparse.Namespace) -> tuple[ResolvedConfig, Path | bool]:
    """The run's settings, resolved once: a resumed run's from its checkpoint, then ``--config``, then the flags."""
    cfg = train_config_from_args(args)
    if not args.resume:
        return resolve_config(cfg), False
    ckpt_path = Path(args.resume) if args.resume is not True else Path(resolve_config(cfg).out) / "checkpoint.pt"
    saved = load_checkpoint(ckpt_path)["config"]
    if args.out is None:
        saved["out"] = str(ckpt_path.parent)
    return resolve_config(train_config_from_args(args, base=saved)), ckpt_path


def _header(cfg: ResolvedConfig, resume: Path | bool) -> str:
    length = f"a {cfg.time_budget:g} s budget" if cfg.time_budget is not None else f"{cfg.iterations} iterations"
    spec = LEARNERS[cfg.algorithm]
    inner = (f"inner lr {cfg.inner_lr} x {cfg.inner_steps} step(s), " if spec.accepts("steps")
             else "no inner loop, ")
    outer = (f"{'Adam' if cfg.outer_optimizer == 'adam' else 'SGD'} {cfg.outer_lr:g}"
             f"{' annealed linearly to 0' if cfg.outer_lr_schedule == 'linear' else ''}")
    return (f"metafunc train: {cfg.algorithm} on {cfg.dataset}, {length}, meta-batch {cfg.meta_batch}, {inner}"
            f"{outer}, device {cfg.device}, out {cfg.out}" + (f" (resuming from {resume})" if resume else ""))


def _report(result: TrainResult, cfg: ResolvedConfig, args: argparse.Namespace) -> None:
    out = result.out
    done = max((r["iteration"] for r in result.records if r.get("split") == "train"), default=0)
    budget = f" ({result.train_seconds:.1f} s of meta-steps, budget {cfg.time_budget:g} s)" if cfg.time_budget else ""
    print(f"trained {done} iterations in {result.seconds:.1f} s{budget}; checkpoint {out / 'checkpoint.pt'}, "
          f"metrics {out / 'metrics.jsonl'}, learning curve {out / 'learning_curve.png'}")
    if result.plan is not None:
        print(f"meta-step: {result.plan} (measured by --mode auto; fix it with --mode loop or --mode vmap)")
    if cfg.dataset == "sinusoid" and not args.no_baseline:
        comparison, results, figure = compare_with_baseline(result, episodes=args.eval_episodes,
                                                            progress=not args.no_progress)
        print(comparison.table())
        print(f"results {results}, figure {figure}")
        return
    val = [r for r in result.records if r.get("split") == "val"]
    if val:
        metric = "accuracy" if "accuracy" in val[-1] else "mse"
        steps = f", {val[-1]['inner_steps']} steps" if LEARNERS[cfg.algorithm].accepts("steps") else ""
        print(f"validation {metric} at iteration {val[-1]['iteration']}: {val[-1][metric]:.4f} +- "
              f"{val[-1][metric + '_ci95']:.4f} ({val[-1]['episodes']} episodes{steps})")
    print(f"test it with: metafunc evaluate {out / 'checkpoint.pt'} --episodes 600")


def _exit_status(error: Exception, is_main: bool) -> int:
    """Say why the run stopped (rank 0 for a signal, every rank for an error) and return its exit status."""
    status = {NonFiniteError: EXIT_NONFINITE, Preempted: EXIT_PREEMPTED, CheckpointError: EXIT_CHECKPOINT}[type(error)]
    if is_main or not isinstance(error, Preempted):
        print(f"metafunc train: {'stopped' if isinstance(error, Preempted) else 'error'}: "
              f"{str(error).removeprefix('train: ')}", file=sys.stderr, flush=True)
    distributed.shutdown_distributed()
    return status


def _rank_failed(error: Exception) -> int:
    """A rank died or hung: say so and exit 1 (the checkpoint on disk is complete: it is written atomically)."""
    print(f"metafunc train: error: {error}", file=sys.stderr, flush=True)
    import torch.distributed as torch_distributed

    if torch_distributed.is_available() and torch_distributed.is_initialized():
        # The broken process group's destructor can abort (SIGABRT) at interpreter exit; leave now.
        sys.stdout.flush()
        os._exit(1)
    return 1


def run_train(args: argparse.Namespace) -> int:
    """``metafunc train``: resolve the settings once, join the process group under ``torchrun``, train, then report
    (and, for the default sinusoid job, compare with the pretrained baseline and draw the paper's figure).

    Example:
        >>> from metafunc.cli import build_parser
        >>> args = build_parser().parse_args(["train", "--dataset", "synthetic", "--iterations", "1", "--width", "8",
        ...                                   "--no-progress", "--out", __import__("tempfile").mkdtemp()])
        >>> run_train(args)  # doctest: +ELLIPSIS
        metafunc train: maml on synthetic, 1 iterations, ...
        0
    """
    cfg, resume = _config(args)
    if cfg.threads is not None:
        import torch
        torch.set_num_threads(cfg.threads)
    is_main = default_is_main()
    try:
        run = join_torchrun(cfg, backend=args.dist_backend, timeout=args.dist_timeout)
        cfg, is_main = run.config, run.is_main
        if is_main and run.description:
            print(f"metafunc train: {run.description}")
        if is_main:
            print(_header(cfg, resume))
        result = train(cfg, resume=resume, overwrite=args.overwrite, is_main=is_main,
                       progress=not args.no_progress, **run.train_kwargs)
    except (NonFiniteError, Preempted, CheckpointError) as e:
        return _exit_status(e, is_main)
    except distributed.DistributedError as e:
        return _rank_failed(e)
    distributed.shutdown_distributed()
    if is_main:
        _report(result, cfg, args)
    return 0
