"""The learners every contract test runs on: small named cases, one line each.

A :class:`LearnerCase` is a name, a learner factory (taking the pure model), a module builder and a tasks builder.
Append a case with one line at the bottom of this file, e.g.::

    CASES.append(LearnerCase("protonet-conv4", lambda m: protonet(m), conv4_module(), classification_tasks()))

``tests/test_contract.py`` then checks it: finite loss, meta-gradient tree equal to the params tree, vmap equal to a
loop, a meta-batch of one, float32/float64 preserved, same seed same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from metafunc import MetaLearner, Params, Task, anil, boil, fomaml, functionalize, maml, meta_sgd, models, reptile
from metafunc.data.sinusoid import sinusoid_tasks

__all__ = [
    "LearnerCase",
    "CASES",
    "case_ids",
    "mlp_module",
    "conv4_module",
    "regression_tasks",
    "classification_tasks",
    "feature_tasks",
]


def mlp_module(*, hidden: tuple[int, ...] = (8, 8), norm: str = "none", in_features: int = 1,
               out_features: int = 1) -> Callable[[], nn.Module]:
    """A builder of a small ReLU MLP (``norm="layer"`` adds metafunc's exact LayerNorm)."""
    return lambda: models.mlp(in_features, hidden, out_features, norm=norm)  # type: ignore[arg-type]


def conv4_module(*, ways: int = 3, width: int = 4, image_size: int = 16, norm: str = "batch") -> Callable[[], nn.Module]:
    """A builder of a narrow Conv-4 (metafunc's exact BatchNorm by default; 16x16 inputs keep the suite fast)."""
    return lambda: models.conv4(ways, width=width, image_size=image_size, norm=norm)  # type: ignore[arg-type]


def regression_tasks(*, shots: int = 5, queries: int = 6) -> Callable[[int, torch.Generator], Task]:
    """A builder of sinusoid regression meta-batches ``(tasks, points, 1)``."""
    def build(num_tasks: int, generator: torch.Generator) -> Task:
        return sinusoid_tasks(num_tasks, shots=shots, queries=queries, generator=generator)  # type: ignore[return-value]

    return build


def _labels(num_tasks: int, ways: int, per_class: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.arange(ways).repeat_interleave(per_class)
    return torch.stack([labels[torch.randperm(labels.numel(), generator=generator)] for _ in range(num_tasks)])


def classification_tasks(*, ways: int = 3, shots: int = 2, queries: int = 2, image_size: int = 16,
                         channels: int = 1) -> Callable[[int, torch.Generator], Task]:
    """A builder of random-image N-way K-shot meta-batches (labels 0..ways-1, every class present, shuffled)."""
    def build(num_tasks: int, generator: torch.Generator) -> Task:
        def images(n: int) -> torch.Tensor:
            return torch.randn(num_tasks, n, channels, image_size, image_size, generator=generator)

        return Task(images(ways * shots), _labels(num_tasks, ways, shots, generator),
                    images(ways * queries), _labels(num_tasks, ways, queries, generator))

    return build


def feature_tasks(*, features: int = 4, ways: int = 3, shots: int = 2, queries: int = 2) -> Callable[[int, torch.Generator], Task]:
    """A builder of classification meta-batches on feature vectors ``(tasks, examples, features)``."""
    def build(num_tasks: int, generator: torch.Generator) -> Task:
        def points(n: int) -> torch.Tensor:
            return torch.randn(num_tasks, n, features, generator=generator)

        return Task(points(ways * shots), _labels(num_tasks, ways, shots, generator),
                    points(ways * queries), _labels(num_tasks, ways, queries, generator))

    return build


@dataclass(frozen=True)
class LearnerCase:
    """One learner on one model and one kind of task.

    ``make_learner(model) -> MetaLearner`` gets the pure model from :func:`metafunc.functionalize`;
    ``make_module() -> nn.Module`` builds the network (seeded by :meth:`build`); ``make_tasks(num_tasks, generator)
    -> Task`` samples a meta-batch.
    """

    id: str
    make_learner: Callable[..., MetaLearner]
    make_module: Callable[[], nn.Module]
    make_tasks: Callable[[int, torch.Generator], Task]
    marks: tuple = field(default=())

    @property
    def learner(self) -> str:
        """The registry name of the case's learner (``metafunc.LEARNERS``): the id up to its first ``-``."""
        return self.id.split("-")[0]

    def build(self, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[MetaLearner, Params, nn.Module]:
        """``(learner, meta_params, module)`` with the module's weights drawn from ``seed``, in ``dtype``."""
        torch.manual_seed(seed)
        module = self.make_module().to(dtype)
        model, params = functionalize(module)
        learner = self.make_learner(model)
        return learner, learner.init(params), module

    def tasks(self, num_tasks: int = 3, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Task:
        """A meta-batch of ``num_tasks`` tasks drawn from ``seed``; floating tensors in ``dtype``."""
        return self.make_tasks(num_tasks, torch.Generator().manual_seed(seed)).to(dtype=dtype)


CASES: list[LearnerCase] = [
    LearnerCase("maml-mlp-sinusoid", lambda m: maml(m, inner_lr=0.05, steps=2, loss="mse"), mlp_module(),
                regression_tasks()),
    LearnerCase("fomaml-mlp-sinusoid", lambda m: fomaml(m, inner_lr=0.05, steps=2, loss="mse"), mlp_module(),
                regression_tasks()),
    LearnerCase("maml-layernorm-mlp-xent", lambda m: maml(m, inner_lr=0.3, steps=2), mlp_module(
        in_features=4, out_features=3, norm="layer"), feature_tasks()),
    LearnerCase("maml-conv4-batchnorm", lambda m: maml(m, inner_lr=0.3, steps=1), conv4_module(),
                classification_tasks()),
    LearnerCase("anil-layernorm-mlp-xent", lambda m: anil(m, inner_lr=0.3, steps=2), mlp_module(
        in_features=4, out_features=3, norm="layer"), feature_tasks()),
    LearnerCase("boil-layernorm-mlp-xent", lambda m: boil(m, inner_lr=0.3, steps=1), mlp_module(
        in_features=4, out_features=3, norm="layer"), feature_tasks()),
    LearnerCase("meta_sgd-layernorm-mlp-sinusoid", lambda m: meta_sgd(m, inner_lr=0.05, steps=2, loss="mse"),
                mlp_module(norm="layer"), regression_tasks()),
    LearnerCase("reptile-mlp-sinusoid", lambda m: reptile(m, inner_lr=0.05, steps=3, loss="mse"), mlp_module(),
                regression_tasks()),
    LearnerCase("reptile-minibatch-conv4-batchnorm", lambda m: reptile(m, inner_lr=0.3, steps=3, inner_batch_size=4),
                conv4_module(), classification_tasks()),
    # Adam normalises each gradient entry, so it is checked on a model without parameters whose gradient is 0 in
    # theory (a bias right before BatchNorm), where it would scale rounding noise up to a step.
    LearnerCase("reptile-adam-minibatch-layernorm-mlp-xent", lambda m: reptile(
        m, inner_lr=0.01, steps=3, inner_optimizer="adam", inner_batch_size=4), mlp_module(
        in_features=4, out_features=3, norm="layer"), feature_tasks()),
]
"""Every case the contract suite runs; append one line to add an algorithm."""


def case_ids(cases: list[LearnerCase] | None = None) -> list[str]:
    """Readable parametrize ids."""
    return [c.id for c in (CASES if cases is None else cases)]

# Metric learners and ProtoMAML (the MLP's output is the embedding; ProtoMAML adds its own output layer).
from metafunc import fo_proto_maml, matching_net, proto_maml, protonet  # noqa: E402

_LN_ENCODER = mlp_module(in_features=4, out_features=5, norm="layer")
CASES += [
    LearnerCase("protonet-layernorm-mlp", lambda m: protonet(m), _LN_ENCODER, feature_tasks()),
    LearnerCase("matching_net-layernorm-mlp", lambda m: matching_net(m), _LN_ENCODER, feature_tasks()),
    LearnerCase("matching_net-fce-layernorm-mlp", lambda m: matching_net(m, fce=True, feature_dim=5), _LN_ENCODER,
                feature_tasks()),
    LearnerCase("matching_net-squared_euclidean-learned_t-conv4-batchnorm", lambda m: matching_net(
        m, distance="squared_euclidean", temperature=4.0, learn_temperature=True), conv4_module(), classification_tasks()),
    LearnerCase("matching_net-cosine-learned_t-fce-layernorm-mlp", lambda m: matching_net(
        m, learn_temperature=True, temperature=0.5, fce=True, feature_dim=5), _LN_ENCODER, feature_tasks()),
    LearnerCase("proto_maml-layernorm-mlp", lambda m: proto_maml(m, inner_lr=0.3, head_lr=0.5, steps=2), _LN_ENCODER,
                feature_tasks()),
    LearnerCase("fo_proto_maml-layernorm-mlp", lambda m: fo_proto_maml(m, inner_lr=0.3, steps=2), _LN_ENCODER,
                feature_tasks()),
    LearnerCase("fo_proto_maml-two_pass-layernorm-mlp", lambda m: fo_proto_maml(m, inner_lr=0.3, steps=2, two_pass=True),
                _LN_ENCODER, feature_tasks()),
]

# The gradient paths for long inner loops (registered learners too: the contract covers every entry of LEARNERS).
from metafunc import checkpointed_maml, imaml, one_step  # noqa: E402

_LN_CLASSIFIER = mlp_module(in_features=4, out_features=3, norm="layer")
CASES += [
    LearnerCase("checkpointed_maml-conv4-batchnorm", lambda m: checkpointed_maml(m, inner_lr=0.3, steps=3, checkpoints=2),
                conv4_module(), classification_tasks()),
    LearnerCase("one_step-layernorm-mlp-xent", lambda m: one_step(m, inner_lr=0.3, steps=3), _LN_CLASSIFIER,
                feature_tasks()),
    LearnerCase("imaml-layernorm-mlp-xent", lambda m: imaml(m, inner_lr=0.1, steps=3, lam=1.0, cg_iterations=3),
                _LN_CLASSIFIER, feature_tasks()),
]

# MAML++ (every part on, inside the multi-step-loss annealing) on a BatchNorm Conv-4.
from metafunc import maml_plus_plus  # noqa: E402

CASES.append(LearnerCase("maml_plus_plus-conv4-batchnorm",
                         lambda m: maml_plus_plus(m, inner_lr=0.3, steps=2, epoch=1, msl_epochs=3),
                         conv4_module(), classification_tasks()))
