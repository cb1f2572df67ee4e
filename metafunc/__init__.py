"""metafunc: meta-learning written functionally on ``torch.func``.

A model is a pure function over a parameter dict; the inner loop is a transform built from ``torch.func.grad``; a
meta-batch of tasks runs at once under ``vmap``. Algorithms are factories returning pure functions.
"""

from . import models, tree
from ._types import AdaptFn, LossFn, Metrics, ModelFn, Params, PerTaskFn, Selector, Task
from .algorithms import META_SGD_LR_PREFIX, MetaLearner, anil, boil, fomaml, maml, meta_sgd, reptile, with_steps
from .algorithms import fo_proto_maml, matching_net, proto_maml, prototype_head, prototypes, protonet
from .batching import meta_batch, resolve_mode
from .fast import meta_value_and_grad
from .compiled import compiled_meta_step
from .functional import FunctionalModel, check_params, functionalize
from .inner import first_order, inner_loop, sgd_step
from .norm import BatchNorm, GroupNorm, LayerNorm, convert_norm_layers, find_torch_norm_layers
from .sinusoid import SinusoidTasks, sinusoid_tasks
from . import paths
from .paths import GRADIENT_PATHS, checkpointed_maml, conjugate_gradient, gradient_path, imaml, one_step
from .resnet import resnet18

__version__ = "0.1.0"

__all__ = [
    # types
    "Params", "Metrics", "Task", "ModelFn", "LossFn", "AdaptFn", "PerTaskFn", "Selector",
    # functional core
    "functionalize", "FunctionalModel", "check_params", "inner_loop", "first_order", "sgd_step", "meta_batch",
    "resolve_mode", "meta_value_and_grad", "compiled_meta_step",
    # norm layers
    "BatchNorm", "LayerNorm", "GroupNorm", "convert_norm_layers", "find_torch_norm_layers",
    # algorithms
    "MetaLearner", "maml", "fomaml", "anil", "boil", "meta_sgd", "reptile", "with_steps", "META_SGD_LR_PREFIX",
    "protonet", "matching_net", "proto_maml", "fo_proto_maml", "prototypes", "prototype_head",
    # gradient paths for long inner loops
    "paths", "GRADIENT_PATHS", "gradient_path", "checkpointed_maml", "imaml", "one_step", "conjugate_gradient",
    "resnet18",
    # tasks and models
    "sinusoid_tasks", "SinusoidTasks", "models", "tree",
]
