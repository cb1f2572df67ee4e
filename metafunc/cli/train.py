"""``metafunc train``: meta-train a registered learner (the default: MAML on sinusoid regression against a
pretrained baseline), on one process or under ``torchrun``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from metafunc import distributed
from metafunc._shared import atomic_write_text, strict_json
from metafunc.cli.options import train_config_from_args
from metafunc.train import (
    EXIT_CHECKPOINT,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    CheckpointError,
    NonFiniteError,
    Preempted,
    default_is_main,
    load_checkpoint,
    plot_sinusoid_adaptation,
    pretrain_baseline,
    resolve_config,
    sinusoid_comparison,
    train,
)

__all__ = ["run_train"]


def run_train(args: argparse.Namespace) -> int:
    """``metafunc train``: resolve the settings, join the process group under ``torchrun``, train, then report
    (and, for the default sinusoid job, compare with the pretrained baseline and draw the paper's figure).

    Example:
        >>> from metafunc.cli import build_parser
        >>> args = build_parser().parse_args(["train", "--dataset", "synthetic", "--iterations", "1", "--width", "8",
        ...                                   "--no-progress", "--out", __import__("tempfile").mkdtemp()])
        >>> run_train(args)  # doctest: +ELLIPSIS
        metafunc train: maml on synthetic, 1 iterations, ...
        0
    """

    resume = args.resume
    cfg = train_config_from_args(args)
    if resume:
        ckpt_path = Path(resume) if resume is not True else Path(resolve_config(cfg).out) / "checkpoint.pt"
        saved = load_checkpoint(ckpt_path)["config"]
        if args.out is None:
            saved["out"] = str(ckpt_path.parent)
        cfg = train_config_from_args(args, base=saved)
        resume = ckpt_path
    cfg = resolve_config(cfg)
    if cfg.threads is not None:
        import torch
        torch.set_num_threads(cfg.threads)
    is_main = default_is_main()
    progress = not args.no_progress

    dist_kwargs: dict[str, Any] = {}
    try:
        if os.environ.get("WORLD_SIZE"):  # launched by torchrun (or any launcher that sets RANK, WORLD_SIZE, ...)
            world_size = int(os.environ["WORLD_SIZE"])
            if cfg.meta_batch < world_size:  # checked before the rendezvous, so every rank says it at once
                raise ValueError(f"metafunc train: --meta-batch {cfg.meta_batch} is smaller than the {world_size} "
                                 "processes; every process needs at least one task")
            info = distributed.init_distributed(backend=args.dist_backend, timeout=args.dist_timeout,
                                                device=cfg.device.split(":")[0])
            if info.device.type == "cuda":
                cfg = resolve_config(dataclasses.replace(cfg, device=str(info.device)))  # rank i: cuda:LOCAL_RANK
            is_main = info.is_main
            dist_kwargs = dict(wrap_step=distributed.sharded, train_source=lambda src:
                               distributed.ShardedSource(src, rank=info.rank, world_size=info.world_size))
            if info.distributed:
                dist_kwargs.update(sync_flag=distributed.any_rank, barrier=distributed.barrier)
            if is_main and info.distributed:
                print(f"metafunc train: {info.world_size} processes ({info.backend}), meta-batch {cfg.meta_batch} "
                      f"split {distributed.shard_sizes(cfg.meta_batch, info.world_size)}, timeout "
                      f"{info.timeout:g} s")
        if is_main:
            length = (f"a {cfg.time_budget:g} s budget" if cfg.time_budget is not None else f"{cfg.iterations} iterations")
            print(f"metafunc train: {cfg.algorithm} on {cfg.dataset}, {length}, meta-batch "
                  f"{cfg.meta_batch}, inner lr {cfg.inner_lr} x {cfg.inner_steps} step(s), "
                  f"{'Adam' if cfg.outer_optimizer == 'adam' else 'SGD'} {cfg.outer_lr:g}"
                  f"{' annealed linearly to 0' if cfg.outer_lr_schedule == 'linear' else ''}, "
                  f"device {cfg.device}, out {cfg.out}" + (f" (resuming from {resume})" if resume else ""))
        result = train(cfg, resume=resume, is_main=is_main, progress=progress, **dist_kwargs)
    except (NonFiniteError, Preempted, CheckpointError) as e:
        status = {NonFiniteError: EXIT_NONFINITE, Preempted: EXIT_PREEMPTED, CheckpointError: EXIT_CHECKPOINT}[type(e)]
        if is_main or not isinstance(e, Preempted):
            print(f"metafunc train: {'stopped' if isinstance(e, Preempted) else 'error'}: "
                  f"{str(e).removeprefix('train: ')}", file=sys.stderr, flush=True)
        distributed.shutdown_distributed()
        return status
    except distributed.DistributedError as e:  # a rank died or hung: say so, exit non-zero (checkpoint intact)
        print(f"metafunc train: error: {e}", file=sys.stderr, flush=True)
        import torch.distributed as torch_distributed

        if torch_distributed.is_available() and torch_distributed.is_initialized():
            # The broken process group's destructor can abort (SIGABRT) at interpreter exit; leave now, with the
            # status that says what happened (the checkpoint on disk is complete: it is written atomically).
            sys.stdout.flush()
            os._exit(1)
        return 1
    distributed.shutdown_distributed()
    if not is_main:
        return 0
    out = result.out
    done = max((r["iteration"] for r in result.records if r.get("split") == "train"), default=0)
    budget = f" ({result.train_seconds:.1f} s of meta-steps, budget {cfg.time_budget:g} s)" if cfg.time_budget else ""
    print(f"trained {done} iterations in {result.seconds:.1f} s{budget}; checkpoint {out / 'checkpoint.pt'}, "
          f"metrics {out / 'metrics.jsonl'}, learning curve {out / 'learning_curve.png'}")
    if cfg.dataset == "sinusoid" and not args.no_baseline:
        baseline = pretrain_baseline(cfg, progress=progress)
        comparison = sinusoid_comparison(result, baseline, episodes=args.eval_episodes)
        print(comparison.table())
        atomic_write_text(out / "sinusoid_results.json", strict_json(comparison.as_dict(), indent=2) + "\n")
        fig = plot_sinusoid_adaptation(result, baseline, out / "sinusoid_adaptation.png")
        print(f"results {out / 'sinusoid_results.json'}, figure {fig}")
    else:
        val = [r for r in result.records if r.get("split") == "val"]
        if val:
            metric = "accuracy" if "accuracy" in val[-1] else "mse"
            print(f"validation {metric} at iteration {val[-1]['iteration']}: {val[-1][metric]:.4f} +- "
                  f"{val[-1][metric + '_ci95']:.4f} ({val[-1]['episodes']} episodes, {val[-1]['inner_steps']} steps)")
        print(f"test it with: metafunc evaluate {out / 'checkpoint.pt'} --episodes 600")
    return 0
