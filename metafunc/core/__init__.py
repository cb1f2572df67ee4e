"""The functional core: a model as a pure function over a parameter dict, parameter trees, the inner loop as a
transform, per-task functions with their checks, and ``meta_batch`` (vmap or loop over tasks)."""

from metafunc.core.batching import meta_batch, resolve_mode, task_memory_estimate
from metafunc.core.functional import (
    FunctionalModel,
    check_model_input,
    check_params,
    check_task_dtypes,
    functionalize,
    thread_safe,
)
from metafunc.core.inner import first_order, inner_loop, sgd_step
from metafunc.core.task_function import TaskFunction, checks_of, per_task_function
from metafunc.core.types import AdaptFn, LossFn, Metrics, ModelFn, Params, PerTaskFn, Selector, Task

__all__ = ["meta_batch", "resolve_mode", "task_memory_estimate", "FunctionalModel", "check_params", "check_task_dtypes",
           "check_model_input", "functionalize",
           "thread_safe", "first_order", "inner_loop", "sgd_step", "TaskFunction", "checks_of", "per_task_function",
           "AdaptFn", "LossFn", "Metrics", "ModelFn", "Params", "PerTaskFn", "Selector", "Task"]
