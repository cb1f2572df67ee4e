"""Gradient paths: ways to compute (or approximate) the meta-gradient of a long inner loop, behind one interface.

Every path is a factory returning a :class:`metafunc.MetaLearner`, so :func:`metafunc.meta_batch`, the contract
suite and the training loop use them unchanged. :func:`gradient_path` builds one by name:

========================  =============================================================  ======================
name                      meta-gradient                                                  memory in ``steps``
========================  =============================================================  ======================
``"exact"``               MAML, differentiated through the unrolled inner loop           grows (every step's graph)
``"first_order"``         ``grad L_q(phi_k)`` (first-order MAML)                          constant
``"checkpointed"``        exact MAML, recomputed from checkpoints, VJP step by step       ``O(sqrt(k))`` parameter copies
``"one_step"``            ``(I - a H_s(theta)) grad L_q(phi_k)`` (lazy, ICCV 2021)         constant
``"implicit"``            iMAML: ``(I + H_s(phi)/lam)^-1 grad L_q(phi)`` by CG              constant
========================  =============================================================  ======================
"""

from __future__ import annotations

from typing import Any, Callable

from .._types import ModelFn
from ..algorithms import MetaLearner, fomaml, maml
from ..algorithms._base import LossSpec
from .checkpointed import checkpoint_positions, checkpointed_maml, default_checkpoints
from .implicit import INNER_SOLVERS, conjugate_gradient, imaml, proximal_inner_loop
from .one_step import one_step, one_step_adapt

__all__ = [
    "GRADIENT_PATHS",
    "PATH_OPTIONS",
    "gradient_path",
    "checkpointed_maml",
    "checkpoint_positions",
    "default_checkpoints",
    "imaml",
    "conjugate_gradient",
    "proximal_inner_loop",
    "INNER_SOLVERS",
    "one_step",
    "one_step_adapt",
]

GRADIENT_PATHS: dict[str, Callable[..., MetaLearner]] = {
    "exact": maml,
    "first_order": fomaml,
    "checkpointed": checkpointed_maml,
    "one_step": one_step,
    "implicit": imaml,
}
"""Name -> factory ``factory(model, *, inner_lr, steps, loss, **options) -> MetaLearner``."""

PATH_OPTIONS: dict[str, tuple[str, ...]] = {
    "exact": ("adapt",),
    "first_order": ("adapt",),
    "checkpointed": ("checkpoints", "clip_norm", "adapt"),
    "one_step": ("adapt",),
    "implicit": ("lam", "cg_iterations", "damping", "solver"),
}
"""The extra keyword options each path accepts."""


def gradient_path(name: str, model: ModelFn, *, inner_lr: float, steps: int, loss: LossSpec = "cross_entropy",
                  **options: Any) -> MetaLearner:
    """Build the learner of gradient path ``name`` (one of :data:`GRADIENT_PATHS`).

    ``options`` are the path's own settings (:data:`PATH_OPTIONS`): ``checkpoints``/``clip_norm`` for
    ``"checkpointed"``, ``lam``/``cg_iterations``/``damping``/``solver`` for ``"implicit"``, ``adapt`` (a parameter
    selector) for the MAML-style paths.

    Example:
        >>> import torch
        >>> from metafunc import functionalize, meta_batch, models, sinusoid_tasks
        >>> model, params = functionalize(models.mlp())
        >>> learner = gradient_path("checkpointed", model, inner_lr=0.01, steps=50, loss="mse", checkpoints=7)
        >>> tasks = sinusoid_tasks(4, shots=10, generator=torch.Generator().manual_seed(0))
        >>> loss, _ = meta_batch(learner.meta_loss)(params, tasks)
        >>> loss.backward()
    """
    if not isinstance(name, str) or name not in GRADIENT_PATHS:
        raise ValueError(
            f"gradient_path: unknown path {name!r}; choose one of {', '.join(map(repr, GRADIENT_PATHS))}"
        )
    unknown = sorted(set(options) - set(PATH_OPTIONS[name]))
    if unknown:
        allowed = ", ".join(PATH_OPTIONS[name]) or "none"
        raise TypeError(f"gradient_path: path {name!r} takes no option(s) {unknown}; its options are: {allowed}")
    return GRADIENT_PATHS[name](model, inner_lr=inner_lr, steps=steps, loss=loss, **options)
