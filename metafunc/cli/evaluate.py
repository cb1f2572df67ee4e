"""``metafunc evaluate``: a checkpoint's accuracy (or MSE) on held-out episodes, mean and 95% CI."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from metafunc._shared import strict_json
from metafunc.registry import LEARNERS
from metafunc.train import (
    BATCHNORM_PROTOCOL,
    TrainConfig,
    build_experiment,
    check_compatible,
    evaluate_episodes,
    load_checkpoint,
    resolve_config,
)

__all__ = ["run_evaluate"]


def run_evaluate(args: argparse.Namespace) -> int:
    """``metafunc evaluate CHECKPOINT``: test accuracy (or MSE) over many episodes with its 95% CI.

    Example:
        >>> from metafunc.cli import build_parser
        >>> args = build_parser().parse_args(["evaluate", "runs/omniglot_maml/checkpoint.pt", "--episodes", "600"])
        >>> run_evaluate(args)  # doctest: +SKIP
    """
    ckpt = load_checkpoint(args.checkpoint)
    saved = dict(ckpt.get("config") or {})
    if not saved:
        raise ValueError(f"metafunc evaluate: {args.checkpoint!r} holds no run configuration; it was not written "
                         "by metafunc train")
    for name in ("ways", "shots", "queries", "data_root", "device"):
        v = getattr(args, name)
        if v is not None:
            saved[name] = v
    if args.inner_steps is not None:
        saved["eval_inner_steps"] = args.inner_steps
    cfg = resolve_config(TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}))
    trained_ways = (ckpt.get("config") or {}).get("ways")
    if LEARNERS[cfg.algorithm].needs_head and cfg.ways != trained_ways and cfg.dataset != "sinusoid":
        raise ValueError(f"metafunc evaluate: the checkpoint was trained {trained_ways}-way (its head has "
                         f"{trained_ways} outputs) and cannot be evaluated {cfg.ways}-way with {cfg.algorithm}; "
                         f"pass --ways {trained_ways} or train a {cfg.ways}-way model")
    exp = build_experiment(cfg)
    check_compatible(ckpt, exp.params, caller="metafunc evaluate")
    params = {k: ckpt["params"][k].to(cfg.device) for k in exp.params}
    bad = [k for k, v in params.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"metafunc evaluate: the checkpoint's parameters {bad[:6]} are not finite (NaN or inf): the run "
                         f"diverged before it was saved; evaluate an earlier checkpoint (e.g. checkpoint.prev.pt)")
    gen = torch.Generator(device=cfg.device).manual_seed(args.seed)
    result = evaluate_episodes(exp.learner, params, exp.sources[args.split], episodes=args.episodes,
                               steps=cfg.eval_inner_steps, classification=exp.classification, generator=gen,
                               batch=args.meta_batch, mode=cfg.mode, progress=not args.no_progress)
    if exp.classification:
        setting = f"{cfg.ways}-way {cfg.shots}-shot, {cfg.queries} queries per class"
    else:
        setting = f"sinusoid regression, K={cfg.shots} support points, 100 query points"
    print(f"checkpoint {args.checkpoint}: {cfg.algorithm} on {cfg.dataset}, {ckpt.get('iteration')} iterations")
    adaptation = ("no inner loop" if not LEARNERS[cfg.algorithm].accepts("steps")
                  else f"{cfg.eval_inner_steps} inner steps (lr {cfg.inner_lr})")
    print(f"{setting}, {adaptation}, {args.episodes} {args.split} episodes")
    print(result.format() + "  [95% CI = 1.96 * std / sqrt(n)]")
    print(f"BatchNorm protocol: {BATCHNORM_PROTOCOL}")
    if args.json:
        record = {**result.as_dict(), "checkpoint": str(args.checkpoint), "split": args.split, "ways": cfg.ways,
                  "shots": cfg.shots, "queries": cfg.queries, "algorithm": cfg.algorithm, "dataset": cfg.dataset,
                  "batchnorm": BATCHNORM_PROTOCOL}
        Path(args.json).write_text(strict_json(record, indent=2) + "\n")
    return 0
