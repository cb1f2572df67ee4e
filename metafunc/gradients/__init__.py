"""Gradient paths: ways to compute (or approximate) the meta-gradient of a long inner loop.

Every path is a factory returning a :class:`metafunc.MetaLearner`, so :func:`metafunc.meta_batch`, the meta-steps,
the contract suite and the trainer use them unchanged. Each is registered in :mod:`metafunc.registry` under its
learner name with the path it implements; ``metafunc.learner_for_path(path).build(model, ...)`` builds one by path name:

========================  =============================================================  ======================
path (learner)            meta-gradient                                                  memory in ``steps``
========================  =============================================================  ======================
``"exact"`` (maml)        MAML, differentiated through the unrolled inner loop           grows (every step's graph)
``"first_order"``         ``grad L_q(phi_k)`` (fomaml)                                   constant
``"checkpointed"``        exact MAML, recomputed from checkpoints, VJP step by step       ``O(sqrt(k))`` parameter copies
``"one_step"``            ``(I - a H_s(theta)) grad L_q(phi_k)`` (lazy, ICCV 2021)         constant
``"implicit"`` (imaml)    iMAML: ``((1+d) I + H_s(phi)/(lam+d_lam))^-1 grad L_q(phi)``, CG   constant
========================  =============================================================  ======================

iMAML's defaults solve the authors' code's damped system (``d = damping = 1``, ``d_lam = lam_damping = 10``); the
paper's ``(I + H_s/lam)`` is ``damping=0, lam_damping=0, inner_loop="proximal"``.
"""

from metafunc.gradients.checkpointed import checkpoint_positions, checkpointed_maml, default_checkpoints
from metafunc.gradients.implicit import (
    CG_DIVERGENCE_ACTIONS,
    INNER_LOOPS,
    INNER_SOLVERS,
    CGDivergenceWarning,
    imaml,
    proximal_inner_loop,
)
from metafunc.gradients.one_step import one_step, one_step_adapt
from metafunc.gradients.solvers import CGSolution, conjugate_gradient, conjugate_gradient_solution

__all__ = [
    "checkpointed_maml",
    "checkpoint_positions",
    "default_checkpoints",
    "imaml",
    "conjugate_gradient",
    "conjugate_gradient_solution",
    "CGSolution",
    "CGDivergenceWarning",
    "CG_DIVERGENCE_ACTIONS",
    "INNER_LOOPS",
    "proximal_inner_loop",
    "INNER_SOLVERS",
    "one_step",
    "one_step_adapt",
]
