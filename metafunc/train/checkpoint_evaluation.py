"""A checkpoint evaluated on held-out episodes: what ``metafunc evaluate`` prints, as a library call.

At other ways than it was trained with, a model with an output layer gets a new head (``new_head``): zero-initialised
and adapted in the inner loop (the MAML family's 20-way protocol; BOIL, whose inner loop leaves the head alone, then
adapts every parameter), or initialised from the support prototypes (``W_k = 2 c_k``, ``b_k = -||c_k||^2`` over the
features before the output layer, as ProtoMAML does) before the learner's own inner loop. On Omniglot's validation
characters the zero head won for BOIL (69.5% against 49.2% at 20-way 1-shot, ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metafunc.algorithms.proto_maml import proto_maml
from metafunc.core.types import Params
from metafunc.registry import LEARNERS
from metafunc.train.checkpoint import check_compatible, load_checkpoint
from metafunc.train.config import ResolvedConfig, TrainConfig, resolve_config
from metafunc.train.evaluation import HEAD_PREFIX, EvalResult, evaluate_episodes, new_output_layer
from metafunc.train.experiment import Experiment, build_experiment

__all__ = ["CheckpointEvaluation", "evaluate_checkpoint", "EVALUATION_OVERRIDES", "NEW_HEADS", "INNER_LOOPS"]

EVALUATION_OVERRIDES = ("ways", "shots", "queries", "data_root", "device", "eval_inner_steps")
"""Settings an evaluation may change from the trained run's."""

INNER_LOOPS = ("learner", "sgd")
"""How a checkpoint adapts at test time (``evaluate_checkpoint(inner_loop=...)``): the trained learner's own inner
loop, or plain gradient descent from the meta-parameters on every parameter at the run's inner learning rate (MAML's
inner loop): iMAML's test protocol in its authors' code (the proximal term's lambda set to 0)."""

NEW_HEADS = ("zero", "prototypes")
"""How a checkpoint's output layer is replaced at another number of ways (``evaluate_checkpoint(new_head=...)``)."""

_PROTOTYPE_HEAD_INNER_LOOPS = {"maml": (True, True), "fomaml": (True, True), "anil": (False, True),
                               "boil": (True, False)}
"""Learners a prototype head is offered for: name -> (the body adapts, the head adapts) in their inner loop."""


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
                        batch: int = 25, progress: bool = False, new_head: str | None = None,
                        inner_loop: str = "learner", **overrides: Any) -> CheckpointEvaluation:
    """Evaluate a ``metafunc train`` checkpoint on ``episodes`` tasks of ``split``, at the trained settings or
    ``overrides`` (:data:`EVALUATION_OVERRIDES`); a learner without an inner loop reports no inner steps.

    At another number of ways, ``new_head`` (:data:`NEW_HEADS`) says how the output layer is replaced: ``"zero"``
    (the default: adapted in the inner loop; every parameter adapts for BOIL) or ``"prototypes"`` (initialised from
    the support prototypes, then the learner's inner loop: BOIL keeps it fixed and adapts the body).
    ``inner_loop="sgd"`` (:data:`INNER_LOOPS`) adapts with plain gradient descent instead of the learner's own inner
    loop (iMAML's test protocol, lambda = 0), for learners whose parameters are the model's.

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
    if inner_loop not in INNER_LOOPS:
        raise ValueError(f"evaluate_checkpoint: inner_loop must be one of {', '.join(INNER_LOOPS)} (got {inner_loop!r})")
    if new_head is not None and new_head not in NEW_HEADS:
        raise ValueError(f"evaluate_checkpoint: new_head must be one of {', '.join(NEW_HEADS)} (got {new_head!r})")
    ckpt = load_checkpoint(checkpoint)
    cfg = _evaluation_config(ckpt, checkpoint, {k: v for k, v in overrides.items() if v is not None})
    trained_ways = (ckpt.get("config") or {}).get("ways")
    new_head = new_head or "zero"
    if new_head == "prototypes" and cfg.algorithm not in _PROTOTYPE_HEAD_INNER_LOOPS:
        raise ValueError(f"evaluate_checkpoint: new_head='prototypes' is offered for "
                         f"{', '.join(_PROTOTYPE_HEAD_INNER_LOOPS)} (got algorithm {cfg.algorithm!r}); use new_head='zero'")
    exp, params, head_note = _parameters(ckpt, build_experiment(cfg), cfg, trained_ways, new_head)
    if inner_loop == "sgd":
        exp, head_note = _sgd_inner_loop(exp, cfg, params, head_note)
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


def _parameters(ckpt: dict[str, Any], exp: Experiment, cfg: ResolvedConfig, trained_ways: int | None,
                new_head: str) -> tuple[Experiment, Params, str | None]:
    """The checkpoint's parameters for this evaluation, checked finite, with the experiment and a note: at another
    number of ways a new output layer (``new_head``, see :func:`evaluate_checkpoint`)."""
    head_note = None
    if LEARNERS[cfg.algorithm].needs_head and cfg.ways != trained_ways and cfg.dataset != "sinusoid":
        saved_params, replaced = new_output_layer(ckpt["params"], exp.params)
        check_compatible({"params": {k: v for k, v in saved_params.items() if k not in replaced}},
                         {k: v for k, v in exp.params.items() if k not in replaced}, caller="metafunc evaluate")
        params = {k: v.to(cfg.device) for k, v in saved_params.items()}
        if new_head == "prototypes":
            exp, params = _prototype_head(exp, cfg, params, replaced)
            head_note = (f"output layer: the {trained_ways}-way checkpoint's head is replaced by one initialised from "
                         f"the support prototypes (W = 2c, b = -||c||^2), then {cfg.algorithm}'s inner loop")
        else:
            exp, head_note = _zero_head(exp, cfg, trained_ways)
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


def _zero_head(exp: Experiment, cfg: ResolvedConfig, trained_ways: int | None) -> tuple[Experiment, str]:
    """The zero-initialised head's experiment and note: BOIL's inner loop leaves the head alone, and a zero head
    passes no gradient to the body, so BOIL is then evaluated with every parameter adapted (MAML's inner loop)."""
    note = (f"output layer: the {trained_ways}-way checkpoint's head is replaced by a zero-initialised {cfg.ways}-way "
            "head, adapted in the inner loop")
    if cfg.algorithm == "boil":
        exp = exp._replace(learner=LEARNERS["maml"].build(exp.model, inner_lr=cfg.inner_lr, steps=cfg.inner_steps,
                                                          loss="cross_entropy"))
        note += " (BOIL adapts only the body, so here every parameter adapts, as in MAML)"
    return exp, note


def _sgd_inner_loop(exp: Experiment, cfg: ResolvedConfig, params: Params,
                    head_note: str | None) -> tuple[Experiment, str]:
    """The experiment with MAML's inner loop (plain gradient descent on every parameter from the meta-parameters)
    in place of the learner's own, and the note that says so."""
    model_names = set(getattr(exp.model, "param_names", params))
    extra = sorted(set(params) - model_names)
    if not LEARNERS[cfg.algorithm].accepts("steps") or extra:
        why = f"its parameters {extra[:3]} are not the model's" if extra else "it has no inner loop"
        raise ValueError(f"evaluate_checkpoint: inner_loop='sgd' adapts the model's parameters by gradient descent, "
                         f"but {cfg.algorithm} cannot be evaluated that way: {why}; use inner_loop='learner'")
    learner = LEARNERS["maml"].build(exp.model, inner_lr=cfg.inner_lr, steps=cfg.eval_inner_steps,
                                     loss="cross_entropy" if exp.classification else "mse")
    note = (f"inner loop: plain gradient descent on every parameter (lr {cfg.inner_lr}) instead of "
            f"{cfg.algorithm}'s own")
    return exp._replace(learner=learner), note if head_note is None else f"{head_note}; {note}"


def _prototype_head(exp: Experiment, cfg: ResolvedConfig, params: Params,
                    replaced: list[str]) -> tuple[Experiment, Params]:
    """ProtoMAML's evaluation of a checkpoint's body: the output layer ``head`` (a linear layer) initialised per task
    from the support prototypes of the features it takes, then the learner's inner loop over body and head."""
    weight, bias = f"{HEAD_PREFIX}.weight", f"{HEAD_PREFIX}.bias"
    if sorted(replaced) != sorted([weight, bias]):
        raise ValueError(f"evaluate_checkpoint: new_head='prototypes' needs a linear output layer {HEAD_PREFIX!r} "
                         f"(parameters {weight!r}, {bias!r}); the checkpoint's replaced parameters are {replaced}")
    model, dim = exp.model, params[weight].shape[1]
    identity = torch.eye(dim, dtype=params[weight].dtype, device=params[weight].device)

    def features(params: Params, x: Tensor) -> Tensor:   # the head as the identity: the features it takes
        return model({**params, weight: identity, bias: torch.zeros_like(identity[0])}, x)

    adapts_body, adapts_head = _PROTOTYPE_HEAD_INNER_LOOPS[cfg.algorithm]
    learner = proto_maml(features, inner_lr=cfg.inner_lr, head_lr=cfg.inner_lr if adapts_head else 0.0,
                         steps=cfg.inner_steps, adapt=None if adapts_body else (lambda name: False))
    body = {k: v for k, v in params.items() if k not in replaced}
    return exp._replace(learner=learner), body
