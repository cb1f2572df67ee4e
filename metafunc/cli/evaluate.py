"""``metafunc evaluate``: a checkpoint's accuracy (or MSE) on held-out episodes, mean and 95% CI."""

from __future__ import annotations

import argparse
from pathlib import Path

from metafunc._shared import strict_json
from metafunc.train import BATCHNORM_PROTOCOL
from metafunc.train.checkpoint_evaluation import CheckpointEvaluation, evaluate_checkpoint

__all__ = ["run_evaluate"]


def run_evaluate(args: argparse.Namespace) -> int:
    """``metafunc evaluate CHECKPOINT``: test accuracy (or MSE) over many episodes with its 95% CI.

    Example:
        >>> from metafunc.cli import build_parser
        >>> args = build_parser().parse_args(["evaluate", "runs/omniglot_maml/checkpoint.pt", "--episodes", "600"])
        >>> run_evaluate(args)  # doctest: +SKIP
    """
    evaluation = evaluate_checkpoint(args.checkpoint, split=args.split, episodes=args.episodes, seed=args.seed,
                                     batch=args.meta_batch, progress=not args.no_progress, new_head=args.new_head,
                                     inner_loop=args.inner_loop, ways=args.ways,
                                     shots=args.shots, queries=args.queries, data_root=args.data_root,
                                     device=args.device, eval_inner_steps=args.inner_steps)
    _print(args, evaluation)
    if args.json:
        cfg, result = evaluation.config, evaluation.result
        record = {**result.as_dict(), "checkpoint": str(args.checkpoint), "split": args.split, "ways": cfg.ways,
                  "shots": cfg.shots, "queries": cfg.queries, "algorithm": cfg.algorithm, "dataset": cfg.dataset,
                  "batchnorm": BATCHNORM_PROTOCOL if evaluation.experiment.batch_norm else None,
                  "trained_ways": evaluation.trained_ways, "output_layer": evaluation.head_note}
        Path(args.json).write_text(strict_json(record, indent=2) + "\n")
    return 0


def _print(args: argparse.Namespace, evaluation: CheckpointEvaluation) -> None:
    cfg, exp, result = evaluation.config, evaluation.experiment, evaluation.result
    if exp.classification:
        setting = f"{cfg.ways}-way {cfg.shots}-shot, {cfg.queries} queries per class"
    else:
        setting = f"sinusoid regression, K={cfg.shots} support points, 100 query points"
    print(f"checkpoint {args.checkpoint}: {cfg.algorithm} on {cfg.dataset}, {evaluation.iteration} iterations")
    adaptation = ("no inner loop" if result.steps is None else f"{cfg.eval_inner_steps} inner steps (lr {cfg.inner_lr})")
    print(f"{setting}, {adaptation}, {args.episodes} {args.split} episodes")
    if evaluation.head_note:
        print(evaluation.head_note)
    print(result.format() + "  [95% CI = 1.96 * std / sqrt(n)]")
    if exp.batch_norm:
        print(f"BatchNorm protocol: {BATCHNORM_PROTOCOL}")
