"""``metafunc evaluate``: a checkpoint's accuracy (or MSE) on held-out episodes, mean and 95% CI."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from metafunc._shared import strict_json
from metafunc.core.types import Params
from metafunc.registry import LEARNERS
from metafunc.train import (
    BATCHNORM_PROTOCOL,
    EvalResult,
    Experiment,
    ResolvedConfig,
    TrainConfig,
    build_experiment,
    check_compatible,
    evaluate_episodes,
    load_checkpoint,
    new_output_layer,
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
    cfg = _evaluation_config(ckpt, args)
    trained_ways = (ckpt.get("config") or {}).get("ways")
    exp = build_experiment(cfg)
    exp, params, head_note = _parameters(ckpt, exp, cfg, trained_ways)
    gen = torch.Generator(device=cfg.device).manual_seed(args.seed)
    result = evaluate_episodes(exp.learner, params, exp.sources[args.split], episodes=args.episodes,
                               steps=cfg.eval_inner_steps, classification=exp.classification, generator=gen,
                               batch=args.meta_batch, mode=cfg.mode, progress=not args.no_progress)
    inner_loop = LEARNERS[cfg.algorithm].accepts("steps")
    if not inner_loop:
        result = result._replace(steps=None)
    _print_result(args, ckpt, cfg, exp, result, head_note, inner_loop)
    if args.json:
        record = {**result.as_dict(), "checkpoint": str(args.checkpoint), "split": args.split, "ways": cfg.ways,
                  "shots": cfg.shots, "queries": cfg.queries, "algorithm": cfg.algorithm, "dataset": cfg.dataset,
                  "batchnorm": BATCHNORM_PROTOCOL if exp.batch_norm else None, "trained_ways": trained_ways,
                  "output_layer": head_note}
        Path(args.json).write_text(strict_json(record, indent=2) + "\n")
    return 0


def _evaluation_config(ckpt: dict[str, Any], args: argparse.Namespace) -> ResolvedConfig:
    """The trained run's settings with the evaluation's overrides (ways, shots, queries, data root, device, steps)."""
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
    return resolve_config(TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}))


def _parameters(ckpt: dict[str, Any], exp: Experiment, cfg: ResolvedConfig,
                trained_ways: int | None) -> tuple[Experiment, Params, str | None]:
    """The checkpoint's parameters for this evaluation (a new zero head at another number of ways, as MAML's 20-way
    protocol does), checked finite; the experiment (BOIL at new ways adapts every parameter) and a note."""
    head_note = None
    if LEARNERS[cfg.algorithm].needs_head and cfg.ways != trained_ways and cfg.dataset != "sinusoid":
        saved_params, replaced = new_output_layer(ckpt["params"], exp.params)
        check_compatible({"params": {k: v for k, v in saved_params.items() if k not in replaced}},
                         {k: v for k, v in exp.params.items() if k not in replaced}, caller="metafunc evaluate")
        params = {k: v.to(cfg.device) for k, v in saved_params.items()}
        head_note = (f"output layer: the {trained_ways}-way checkpoint's head is replaced by a zero-initialised "
                     f"{cfg.ways}-way head, adapted in the inner loop")
        if cfg.algorithm == "boil":
            # BOIL's inner loop leaves the head alone, and a zero head passes no gradient to the body: evaluate it
            # with every parameter adapted (MAML's inner loop), and say so.
            exp = exp._replace(learner=LEARNERS["maml"].build(exp.model, inner_lr=cfg.inner_lr, steps=cfg.inner_steps,
                                                              loss="cross_entropy"))
            head_note += " (BOIL adapts only the body, so here every parameter adapts, as in MAML)"
        if any("/" in k for k in replaced):
            head_note += "; its Meta-SGD learning rates are the mean of the trained head's"
    else:
        check_compatible(ckpt, exp.params, caller="metafunc evaluate")
        params = {k: ckpt["params"][k].to(cfg.device) for k in exp.params}
    bad = [k for k, v in params.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"metafunc evaluate: the checkpoint's parameters {bad[:6]} are not finite (NaN or inf): the run "
                         f"diverged before it was saved; evaluate an earlier checkpoint (e.g. checkpoint.prev.pt)")
    return exp, params, head_note


def _print_result(args: argparse.Namespace, ckpt: dict[str, Any], cfg: ResolvedConfig, exp: Experiment,
                  result: EvalResult, head_note: str | None, inner_loop: bool) -> None:
    if exp.classification:
        setting = f"{cfg.ways}-way {cfg.shots}-shot, {cfg.queries} queries per class"
    else:
        setting = f"sinusoid regression, K={cfg.shots} support points, 100 query points"
    print(f"checkpoint {args.checkpoint}: {cfg.algorithm} on {cfg.dataset}, {ckpt.get('iteration')} iterations")
    adaptation = f"{cfg.eval_inner_steps} inner steps (lr {cfg.inner_lr})" if inner_loop else "no inner loop"
    print(f"{setting}, {adaptation}, {args.episodes} {args.split} episodes")
    if head_note:
        print(head_note)
    print(result.format() + "  [95% CI = 1.96 * std / sqrt(n)]")
    if exp.batch_norm:
        print(f"BatchNorm protocol: {BATCHNORM_PROTOCOL}")
