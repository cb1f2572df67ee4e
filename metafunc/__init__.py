"""metafunc: meta-learning written functionally on ``torch.func``.

A model is a pure function over a parameter dict; the inner loop is a transform built from ``torch.func.grad``; a
meta-batch of tasks runs at once under ``vmap``. Algorithms are factories returning pure functions.

The layers, from the bottom up (each imports only the ones above it in this list):

* :mod:`metafunc.core`: ``functionalize``, the parameter-tree helpers, the inner loop, ``meta_batch``;
* :mod:`metafunc.nn`: exact norm layers, the MLP, Conv-4, ResNet-18 and ResNet-12;
* :mod:`metafunc.algorithms` and :mod:`metafunc.gradients`: the learners and the gradient paths (a new learner
  is built on :mod:`metafunc.algorithms.base`: ``make_learner``, ``check_model``, ``resolve_loss``);
* :mod:`metafunc.registry`: every learner by name;
* :mod:`metafunc.step`: the meta-step ``step(params, tasks) -> (loss, metrics, grads)``, default and compiled;
* :mod:`metafunc.data`: tasks and episodes; :mod:`metafunc.distributed`: the sharded step;
* :mod:`metafunc.train` and :mod:`metafunc.cli`: the trainer and the ``metafunc`` command.

``import metafunc`` loads the core, the models, the learners, the registry and the step; the trainer, the CLI and
``torch.distributed`` are imported only when used.
"""

from metafunc import gradients, registry
from metafunc.algorithms import (
    META_SGD_LR_PREFIX,
    LossSpec,
    MetaLearner,
    anil,
    boil,
    check_model,
    fo_proto_maml,
    fomaml,
    make_learner,
    maml,
    maml_plus_plus,
    matching_net,
    meta_sgd,
    proto_maml,
    protonet,
    prototype_head,
    prototypes,
    reptile,
    resolve_loss,
    with_steps,
)
from metafunc.core import tree
from metafunc.core.batching import meta_batch, resolve_mode
from metafunc.core.functional import FunctionalModel, check_params, functionalize
from metafunc.core.inner import first_order, inner_loop, sgd_step
from metafunc.core.padding import PAD_LABEL, pad_tasks, way_masked_cross_entropy
from metafunc.core.task_function import TaskFunction
from metafunc.core.types import AdaptFn, LossFn, Metrics, ModelFn, Params, PerTaskFn, Selector, Task
from metafunc.data.sinusoid import SinusoidTasks, sinusoid_tasks
from metafunc.gradients import checkpointed_maml, conjugate_gradient, imaml, one_step
from metafunc.nn import models
from metafunc.nn.norm import BatchNorm, GroupNorm, LayerNorm, convert_norm_layers, find_torch_norm_layers
from metafunc.nn.resnet import resnet18
from metafunc.nn.resnet12 import resnet12
from metafunc.registry import LEARNERS, LearnerSpec, learner_for_path, path_names, register_learner
from metafunc.step import MetaStep, apply_grads, compiled_meta_step, meta_value_and_grad

__version__ = "0.1.0"

__all__ = [
    # types
    "Params", "Metrics", "Task", "ModelFn", "LossFn", "AdaptFn", "PerTaskFn", "Selector", "TaskFunction",
    # functional core
    "functionalize", "FunctionalModel", "check_params", "inner_loop", "first_order", "sgd_step", "meta_batch",
    "resolve_mode",
    # padded meta-batches: episodes with varying ways and shots (metafunc.core.padding)
    "pad_tasks", "PAD_LABEL", "way_masked_cross_entropy",
    # the meta-step
    "MetaStep", "apply_grads", "meta_value_and_grad", "compiled_meta_step",
    # norm layers
    "BatchNorm", "LayerNorm", "GroupNorm", "convert_norm_layers", "find_torch_norm_layers",
    # algorithms
    "MetaLearner", "maml", "fomaml", "anil", "boil", "meta_sgd", "reptile", "with_steps", "META_SGD_LR_PREFIX",
    "maml_plus_plus",
    "protonet", "matching_net", "proto_maml", "fo_proto_maml", "prototypes", "prototype_head",
    # writing a learner (metafunc.algorithms.base)
    "make_learner", "check_model", "resolve_loss", "LossSpec",
    # gradient paths for long inner loops
    "gradients", "learner_for_path", "path_names", "checkpointed_maml", "imaml", "one_step", "conjugate_gradient",
    # the registry
    "registry", "LEARNERS", "LearnerSpec", "register_learner",
    # tasks and models
    "sinusoid_tasks", "SinusoidTasks", "models", "resnet18", "resnet12", "tree",
]
