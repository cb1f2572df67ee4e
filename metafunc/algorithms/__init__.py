"""Meta-learning algorithms, each a factory returning a :class:`MetaLearner` of pure functions.

:mod:`metafunc.algorithms.base` is the learner base for anyone writing a learner: :func:`make_learner`,
:func:`check_model`, :func:`resolve_loss`, :func:`learner_checks`, :func:`task_metrics` and ``LossSpec``.
"""

from metafunc.algorithms.base import (
    LossSpec,
    MetaLearner,
    check_model,
    learner_checks,
    make_learner,
    resolve_loss,
    task_metrics,
    with_steps,
)
from metafunc.algorithms.maml import META_SGD_LR_PREFIX, anil, boil, fomaml, maml, meta_sgd
from metafunc.algorithms.maml_plus_plus import maml_plus_plus, msl_weights
from metafunc.algorithms.matching import matching_net
from metafunc.algorithms.proto_maml import fo_proto_maml, proto_maml, prototype_head
from metafunc.algorithms.protonet import protonet, prototypes
from metafunc.algorithms.reptile import reptile

__all__ = ["MetaLearner", "with_steps", "maml", "fomaml", "anil", "boil", "meta_sgd", "reptile", "META_SGD_LR_PREFIX",
           "maml_plus_plus", "msl_weights",
           "protonet", "matching_net", "proto_maml", "fo_proto_maml", "prototypes", "prototype_head",
           # the learner base, for writing a learner
           "make_learner", "check_model", "resolve_loss", "learner_checks", "task_metrics", "LossSpec"]
