"""Every registered learner learns 5-way 1-shot Omniglot (the real data) at a small budget, through the public trainer.

Each learner in :data:`metafunc.LEARNERS` (a new one gets a test by being registered) is trained by
``metafunc.train.train`` on the small background zips (Korean and Sanskrit held out) at ``BUDGET`` (Conv-4 of width 16,
meta-batch 4, 80 Adam steps at 3e-3, 5 queries per class), with its own settings from ``SETTINGS`` where the defaults
do not fit it, then validated on 100 fixed episodes of the validation characters (3 inner steps). The test asserts
that training added at least ``GAIN`` (15 points) to the initialisation's validation accuracy, and reached ``FLOOR``
(50%; chance is 20%). The gain is what counts: a randomly initialised Conv-4, adapted or used as a nearest-prototype
embedding, already scores 35 to 46% here. The initialisation's accuracy is that of the same run stopped after one
step with a zeroed meta-gradient (Adam then moves no parameter), validated on the same episodes.

``GAIN`` is one a broken meta-gradient misses, shown, not assumed (``test_a_broken_meta_gradient_misses_the_gain``):
the same budget and seed with the meta-gradient's sign flipped (ascent), or with each training task's query labels
shuffled (a meta-gradient that says nothing about the task), gains at most 3.2 points (MAML, shuffled; at seeds 1 and
2: 9.6 and 3.6), while the learners gain 20 to 39 points (seeds 1 and 2, the weakest measured: MAML 30.2 and 27.0,
Reptile 19.8 and 22.0, Matching Nets 26.3 and 18.5).

Measured at this budget (seed 0, torch 2.13.0, 1 thread, a 2-core CPU; fractions of the validation queries right;
"flipped"/"shuffled": the broken meta-gradients; seconds: CPU time of the trained run with its validation). The
whole file took 202 to 211 s (the one-step runs for the initial accuracy included), the same numbers each time.

==================  ======  =======  =======  ========  =====
learner             before  learned  flipped  shuffled  CPU s
==================  ======  =======  =======  ========  =====
maml                0.380   0.677    0.203    0.412     8.4
fomaml              0.536   0.738             0.300     8.3
anil                0.346   0.642                       5.5
boil                0.456   0.756                       8.0
meta_sgd            0.380   0.646                       7.3
reptile             0.380   0.599    0.221              9.0
maml_plus_plus      0.382   0.774                       14.1
checkpointed_maml   0.380   0.689                       24.6
one_step            0.380   0.677                       10.9
imaml               0.401   0.676                       28.5
protonet            0.409   0.778    0.278    0.298     4.7
matching_net        0.410   0.622                       4.4
proto_maml          0.346   0.598                       8.0
fo_proto_maml       0.346   0.638                       6.7
==================  ======  =======  =======  ========  =====
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from metafunc import LEARNERS
from metafunc.step import MetaStep
from metafunc.train import TrainConfig, train

BUDGET: dict[str, Any] = dict(dataset="omniglot", ways=5, shots=1, queries=5, width=16, meta_batch=4, iterations=80,
                              outer_lr=3e-3, val_episodes=100, val_every=0, checkpoint_every=0, seed=0)
"""The small budget every learner trains with (the Omniglot defaults otherwise: inner_lr 0.4, 1 inner step in
training and 3 in validation)."""

SETTINGS: dict[str, dict[str, Any]] = {
    # first-order MAML's approximation needs a smaller inner step: at MAML's (inner_lr 0.4, 1 step) it gains only
    # 0.380 -> 0.488 at this budget; at 0.1 with 3 steps, 0.536 -> 0.738
    "fomaml": dict(inner_lr=0.1, inner_steps=3),
    "reptile": dict(inner_steps=5),                                      # Reptile takes several SGD steps per task
    "maml_plus_plus": dict(inner_steps=2),                               # a multi-step loss needs steps
    "checkpointed_maml": dict(inner_steps=2, options=dict(checkpoints=1)),  # step 1 recomputed from step 0
    "imaml": dict(inner_steps=2),
}
"""A learner's own settings on top of ``BUDGET``, where its defaults do not fit a small budget."""

GAIN = 0.15
"""Validation accuracy that training must add to the initialisation's (a fraction of the 100 episodes' queries)."""

FLOOR = 0.5
"""Validation accuracy every trained learner must reach (chance is 0.2)."""

XFAIL: dict[str, str] = {}
"""Learners that do not learn at this budget today, with the measured numbers (strict: a fix makes the test fail)."""


def zeroed(step: MetaStep) -> MetaStep:
    """``step`` with its meta-gradient replaced by zeros: the outer optimizer leaves the parameters as they are."""
    def wrapped(params, tasks):
        loss, metrics, grads = step(params, tasks)
        return loss, metrics, {k: torch.zeros_like(g) for k, g in grads.items()}
    return wrapped


def sign_flipped(step: MetaStep) -> MetaStep:
    """``step`` with its meta-gradient negated: the outer optimizer ascends the meta-loss."""
    def wrapped(params, tasks):
        loss, metrics, grads = step(params, tasks)
        return loss, metrics, {k: -g for k, g in grads.items()}
    return wrapped


def shuffled_query_labels(step: MetaStep) -> MetaStep:
    """``step`` on tasks whose query labels are shuffled within each task (a fixed generator): the meta-gradient is
    computed, but it no longer says anything about the task."""
    generator = torch.Generator().manual_seed(123)

    def wrapped(params, tasks):
        order = torch.argsort(torch.rand(tasks.query_y.shape, generator=generator), dim=1)
        return step(params, tasks._replace(query_y=torch.gather(tasks.query_y, 1, order)))
    return wrapped


BROKEN: dict[str, Callable[[MetaStep], MetaStep]] = {"sign_flipped": sign_flipped,
                                                     "shuffled_query_labels": shuffled_query_labels}


@pytest.fixture(scope="module")
def accuracy(data_root: Path, tmp_path_factory) -> Callable[..., float]:
    """``accuracy(name, wrap=None, iterations=None)``: the last validation accuracy of ``name`` trained at its budget
    (``wrap`` applied to the trainer's meta-step), each run once per module."""
    runs: dict[tuple[str, str, int], float] = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is as fast and steadier on a shared 2-core CPU
    with pytest.MonkeyPatch.context() as patch:  # decode the zips once per session, shared with test_omniglot.py
        patch.setenv("METAFUNC_CACHE", str(tmp_path_factory.getbasetemp() / "omniglot_cache"))

        def run(name: str, wrap: Callable[[MetaStep], MetaStep] | None = None, iterations: int | None = None) -> float:
            settings = {**BUDGET, **SETTINGS.get(name, {})}
            if iterations is not None:
                settings["iterations"] = iterations
            key = (name, getattr(wrap, "__name__", "none"), settings["iterations"])
            if key not in runs:
                out = tmp_path_factory.mktemp(f"{name}_{key[1]}")
                cfg = TrainConfig(algorithm=name, data_root=str(data_root / "omniglot"), out=str(out), **settings)
                start = time.process_time()
                result = train(cfg, progress=False, wrap_step=wrap)
                runs[key] = [r for r in result.records if r["split"] == "val"][-1]["accuracy"]
                print(f"{name} {key[1]} {key[2]} iterations: validation accuracy {runs[key]:.3f} "
                      f"({time.process_time() - start:.1f} s CPU)")
            return runs[key]

        yield run
    torch.set_num_threads(previous)


def initial(accuracy: Callable[..., float], name: str) -> float:
    """The initialisation's validation accuracy: one step with a zeroed meta-gradient."""
    return accuracy(name, zeroed, iterations=1)


def _learner_params() -> list[Any]:
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=XFAIL[name])) if name in XFAIL else name
            for name in LEARNERS]


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("name", _learner_params())
def test_learner_learns_5way_1shot_omniglot(name: str, accuracy):
    before, learned = initial(accuracy, name), accuracy(name)
    assert learned >= FLOOR, f"{name}: validation accuracy {learned:.3f} is below {FLOOR} after training"
    assert learned >= before + GAIN, (f"{name}: validation accuracy {learned:.3f} after {BUDGET['iterations']} "
                                      f"iterations is not {GAIN:.2f} above the initialisation's {before:.3f}")


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize(("name", "broken"), [("maml", "sign_flipped"), ("maml", "shuffled_query_labels"),
                                              ("protonet", "sign_flipped"), ("protonet", "shuffled_query_labels"),
                                              ("reptile", "sign_flipped")])
def test_a_broken_meta_gradient_misses_the_gain(name: str, broken: str, accuracy):
    """The test above can fail: the same budget with a broken meta-gradient stays below its threshold. (Reptile's
    meta-gradient reads only the support set, whose labels in 1-shot tasks can be permuted without harm, so it is
    broken by the sign only.)"""
    before, got = initial(accuracy, name), accuracy(name, BROKEN[broken])
    assert got < before + GAIN, (f"{name} with a {broken} meta-gradient reached {got:.3f} from {before:.3f}: "
                                 f"GAIN {GAIN} does not catch a broken meta-gradient")
