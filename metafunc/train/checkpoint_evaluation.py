"""A checkpoint evaluated on held-out episodes: what ``metafunc evaluate`` prints, as a library call.

At other ways than it was trained with, a model with an output layer gets a zero-initialised head adapted in the inner
loop (the MAML family's 20-way protocol); BOIL, whose inner loop leaves the head alone, then adapts every parameter.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from metafunc.core.types import Params
from metafunc.registry import LEARNERS
from metafunc.train.checkpoint import check_compatible, load_checkpoint
from metafunc.train.config import ResolvedConfig, TrainConfig, resolve_config
from metafunc.train.evaluation import EvalResult, evaluate_episodes, new_output_layer
from metafunc.train.experiment import Experiment, build_experiment

__all__ = ["CheckpointEvaluation", "evaluate_checkpoint", "EVALUATION_OVERRIDES"]

EVALUATION_OVERRIDES = ("ways", "shots", "queries", "data_root", "device", "eval_inner_steps")
"""Settings an evaluation may change from the trained run's."""


class CheckpointEvaluation(NamedTuple):
    """The result, the settings it was measured at, the experiment, the checkpoint's iteration and trained ways, and
    a note when the output layer was replaced (``None`` otherwise).

    Example:
        >>> CheckpointEvaluation(None, None, None, 3, 5, None).iteration
        3
    """

    result: EvalResult
    config: ResolvedConfig
    experiment: Experiment
    iteration: int
    trained_ways: int | None
    head_note: str | None


def evaluate_checkpoint(checkpoint: str | os.PathLike, *, split: str = "test", episodes: int = 600, seed: int = 0,
                        batch: int = 25, progress: bool = False, **overrides: Any) -> CheckpointEvaluation:
    """Evaluate a ``metafunc train`` checkpoint on ``episodes`` tasks of ``split``, at the trained settings or
    ``overrides`` (:data:`EVALUATION_OVERRIDES`); a learner without an inner loop reports no inner steps.

    Example:
        >>> import tempfile
        >>> from metafunc.train import train
        >>> run = train(TrainConfig(dataset="synthetic", iterations=2, width=8, out=tempfile.mkdtemp()), progress=False)
        >>> evaluation = evaluate_checkpoint(run.out / "checkpoint.pt", episodes=10, ways=3)
        >>> evaluation.result.episodes, evaluation.config.ways, evaluation.trained_ways
        (10, 3, 5)
    """
    unknown = sorted(set(overrides) - set(EVALUATION_OVERRIDES))
    if unknown:
        raise TypeError(f"evaluate_checkpoint: unknown setting(s) {unknown}; it takes {', '.join(EVALUATION_OVERRIDES)}")
    ckpt = load_checkpoint(checkpoint)
    cfg = _evaluation_config(ckpt, checkpoint, {k: v for k, v in overrides.items() if v is not None})
    trained_ways = (ckpt.get("config") or {}).get("ways")
    exp, params, head_note = _parameters(ckpt, build_experiment(cfg), cfg, trained_ways)
    result = evaluate_episodes(exp.learner, params, exp.sources[split], episodes=episodes,
                               steps=cfg.eval_inner_steps, classification=exp.classification,
                               generator=torch.Generator(device=cfg.device).manual_seed(seed), batch=batch,
                               mode=cfg.mode, progress=progress)
    if not LEARNERS[cfg.algorithm].accepts("steps"):
        result = result._replace(steps=None)
    return CheckpointEvaluation(result, cfg, exp, int(ckpt.get("iteration", 0)), trained_ways, head_note)


def _evaluation_config(ckpt: dict[str, Any], path: str | os.PathLike, overrides: dict[str, Any]) -> ResolvedConfig:
    """The trained run's settings with the evaluation's overrides."""
    saved = dict(ckpt.get("config") or {})
    if not saved:
        raise ValueError(f"metafunc evaluate: {str(path)!r} holds no run configuration; it was not written "
                         "by metafunc train")
    saved.update(overrides)
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
