"""Turn an ``nn.Module`` into a pure function over a parameter dict, without mutating the module."""

from __future__ import annotations

import copy
import sys
import threading
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metafunc.core.types import Params, Task, check_task
from metafunc.nn.norm import find_torch_norm_layers

__all__ = ["FunctionalModel", "functionalize", "check_params", "check_task_dtypes", "check_model_input", "thread_safe",
           "checked_inputs"]


class FunctionalModel:
    """A module seen as a pure function ``model(params, x)``; buffers are held as constants.

    The wrapped module is never mutated: each call goes through :func:`torch.func.functional_call` with
    ``strict=True``, so a missing or extra parameter is an error rather than a silent fall-back to the module's own
    weights. ``torch_norm_layers`` lists torch norm layers that would give wrong second-order gradients under
    ``vmap``; the algorithms refuse such a model when they would be vmapped at second order.

    Calls from several threads at once are safe: ``functional_call`` swaps tensors into the module for the length
    of a call, so a thread other than the one that built the model calls a private copy of the module (made once
    per thread, and again when the module's ``train``/``eval`` flags change). ``meta_value_and_grad`` uses this to
    run the tasks of a meta-batch on several CPU cores.

    Example:
        >>> model, params = functionalize(nn.Linear(3, 2))
        >>> model(params, torch.randn(5, 3)).shape
        torch.Size([5, 2])
    """

    def __init__(self, module: nn.Module, buffers: Params | None = None):
        self.module = module
        self.buffers: Params = dict(buffers) if buffers is not None else {
            k: v.detach().clone() for k, v in module.named_buffers()
        }
        self.param_names: tuple[str, ...] = tuple(k for k, _ in module.named_parameters())
        self.torch_norm_layers: list[str] = find_torch_norm_layers(module)
        self.__name__ = type(module).__name__
        self._owner = threading.get_ident()
        self._local = threading.local()

    def _module_for_this_thread(self) -> nn.Module:
        if torch.compiler.is_compiling() or threading.get_ident() == self._owner:
            return self.module
        flags = tuple(m.training for m in self.module.modules())
        replica = getattr(self._local, "replica", None)
        if replica is None or self._local.flags != flags:
            replica = copy.deepcopy(self.module)  # its own tensors are never read: functional_call swaps all of them
            self._local.replica, self._local.flags = replica, flags
        return replica

    def __call__(self, params: Params, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        state = {**params, **self.buffers} if self.buffers else params
        return functional_call(self._module_for_this_thread(), state, (x, *args), kwargs, strict=True)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "_owner")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._owner = threading.get_ident()
        self._local = threading.local()

    def init_params(self) -> Params:
        """A fresh copy of the module's parameters as leaf tensors that require grad."""
        return {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in self.module.named_parameters()}

    def __repr__(self) -> str:
        return f"FunctionalModel({self.module.__class__.__name__}, {len(self.param_names)} parameter tensors)"


def functionalize(module: nn.Module) -> tuple[FunctionalModel, Params]:
    """Return ``(model, params)``: a pure ``model(params, x)`` and a copy of the module's parameters.

    The parameters are fresh leaf tensors (``requires_grad=True``), ready for ``torch.optim``; the module is left
    as it was. Buffers (running statistics, constants) are copied into the model as constants. A Hugging Face
    ``transformers`` model (BERT, RoBERTa, DistilBERT) is wrapped in :class:`metafunc.hf.TransformerEncoder` first,
    so that it is exact under ``vmap`` and takes integer tokens (a ``peft`` model wrapping one too); other
    ``transformers`` models are refused there.

    Example:
        >>> model, params = functionalize(nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1)))
        >>> sorted(params)
        ['0.bias', '0.weight', '2.bias', '2.weight']
        >>> opt = torch.optim.Adam(params.values(), lr=1e-3)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"functionalize: module must be an nn.Module (got {type(module).__name__})")
    if "transformers" in sys.modules:  # a transformers model can exist only once transformers is imported
        from metafunc.hf import TransformerEncoder, is_transformers_model

        if is_transformers_model(module):
            module = TransformerEncoder(module)
    model = FunctionalModel(module)
    return model, model.init_params()


def check_params(params: Any, model: Any, *, caller: str, exact: bool = False) -> None:
    """Raise a clear error when ``params`` is not a dict of tensors matching ``model``'s parameter names.

    Missing names are refused. Extra keys are allowed unless ``exact=True`` (Meta-SGD's learning rates live next to
    the model's weights, so a learner checks what its model receives with ``exact=True``): then keys that are
    neither a parameter nor a buffer of the model are refused, naming them, since the model's ``functional_call``
    runs with ``strict=True``.

    Example:
        >>> model, params = functionalize(nn.Linear(2, 1))
        >>> check_params(params, model, caller="maml")
        >>> check_params({**params, "scale": torch.ones(())}, model, caller="maml", exact=True)
        Traceback (most recent call last):
        ...
        ValueError: maml: params has keys the model does not take: ['scale'] (its parameters are ['weight', 'bias']); pass the dict returned by functionalize(module) (or learner.init(params)) without other entries
    """
    if not isinstance(params, dict):
        raise TypeError(f"{caller}: params must be a dict of tensors, as returned by functionalize (got {type(params).__name__})")
    bad = [k for k, v in params.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"{caller}: params must hold tensors; {bad[:5]} are not")
    names = getattr(model, "param_names", None)
    if names is None:
        return
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(
            f"{caller}: params is missing {missing[:6]}{' ...' if len(missing) > 6 else ''}; "
            "pass the dict returned by functionalize(module) (or learner.init(params))"
        )
    if exact:
        known = set(names) | set(getattr(model, "buffers", None) or ())
        extra = [k for k in params if k not in known]
        if extra:
            shown = list(names[:6]) + (["..."] if len(names) > 6 else [])
            raise ValueError(
                f"{caller}: params has keys the model does not take: {extra[:6]}{' ...' if len(extra) > 6 else ''} "
                f"(its parameters are {shown}); pass the dict returned by functionalize(module) "
                "(or learner.init(params)) without other entries"
            )


def check_task_dtypes(params: Params, tasks: Task, *, caller: str) -> None:
    """Refuse floating-point task tensors whose dtype differs from the parameters' (float64 tasks with float32
    parameters fail inside the first layer otherwise); integer labels and token ids are not compared. Parameters of
    several floating dtypes are left alone.

    Example:
        >>> params = {"w": torch.zeros(2, 1)}
        >>> check_task_dtypes(params, Task(*(torch.zeros(1, 3, 2, dtype=torch.float64),) * 4), caller="maml")
        Traceback (most recent call last):
        ...
        TypeError: maml: task.support_x is torch.float64 but the parameters are torch.float32; make them match: convert the tasks with tasks.to(torch.float32) (.float() on each tensor), or the model with module.to(torch.float64) (.double()) before functionalize
    """
    dtypes = {v.dtype for v in params.values() if isinstance(v, Tensor) and v.is_floating_point()}
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    for name, t in zip(Task._fields, tasks):
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype:
            raise TypeError(
                f"{caller}: task.{name} is {t.dtype} but the parameters are {dtype}; make them match: convert the "
                f"tasks with tasks.to({dtype}) ({_short_cast(dtype)} on each tensor), or the model with "
                f"module.to({t.dtype}) ({_short_cast(t.dtype)}) before functionalize"
            )


def _short_cast(dtype: torch.dtype) -> str:
    return {torch.float32: ".float()", torch.float64: ".double()", torch.float16: ".half()",
            torch.bfloat16: ".bfloat16()"}.get(dtype, f".to({dtype})")


def _first_layer(model: Any) -> tuple[str, nn.Module] | None:
    """The layer that sees the inputs first, when that is plain to see: the first ``nn.Linear`` or convolution of
    the model's module, provided no other layer with parameters comes before it."""
    module = getattr(model, "module", None)
    if not isinstance(module, nn.Module):
        return None
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            return name or "<root>", m
        if next(m.parameters(recurse=False), None) is not None:
            return None
    return None


def _expected_example_shape(layer: nn.Module, x: Tensor) -> str | None:
    """The example shape ``layer`` takes, as text, when ``x`` (examples first) does not have it; else None."""
    if isinstance(layer, nn.Linear):
        ok = x.dim() >= 2 and x.shape[-1] == layer.in_features
        return None if ok else f"(..., {layer.in_features})"
    if isinstance(layer, nn.modules.conv._ConvNd):
        spatial = len(layer.kernel_size)
        ok = x.dim() == spatial + 2 and x.shape[1] == layer.in_channels
        names = {1: ["L"], 2: ["H", "W"], 3: ["D", "H", "W"]}.get(spatial, ["..."])
        return None if ok else f"({', '.join([str(layer.in_channels), *names])})"
    return None


def check_model_input(model: Any, params: Params, x: Tensor, *, caller: str, name: str = "task.support_x") -> Tensor:
    """``model(params, x)`` without a graph: the eager probe a learner runs on a few examples before any transform.

    An input the model cannot take is a ``ValueError`` raised from torch's error: with the first layer's expected
    example shape and the one given when the first layer refuses it, else with torch's message and the example
    shape (running out of memory is re-raised as it is).

    Example:
        >>> model, params = functionalize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
        >>> check_model_input(model, params, torch.ones(2, 4), caller="maml").shape
        torch.Size([2, 3])
        >>> check_model_input(model, params, torch.ones(2, 5), caller="maml")
        Traceback (most recent call last):
        ...
        ValueError: maml: the model's first layer '0' (Linear) takes examples of shape (..., 4) but task.support_x has examples of shape (5,); reshape the tasks' inputs or build the model for examples of shape (5,)
    """
    try:
        with torch.no_grad():
            return model(params, x)  # type: ignore[no-any-return]
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        got = tuple(x.shape[1:])
        first = _first_layer(model)
        expected = _expected_example_shape(first[1], x) if first is not None else None
        if first is not None and expected is not None:
            raise ValueError(
                f"{caller}: the model's first layer '{first[0]}' ({type(first[1]).__name__}) takes examples of shape "
                f"{expected} but {name} has examples of shape {got}; reshape the tasks' inputs or build the model "
                f"for examples of shape {got}"
            ) from error
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"{caller}: the model failed on {x.shape[0]} examples of {name} (example shape {got}, {x.dtype}, "
            f"{x.device}): {message}; check that the tasks' inputs have the shape, dtype and device the model was "
            "built for"
        ) from error


_SHARED_STATE_MODULES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, nn.TransformerEncoderLayer,
                                                      nn.TransformerDecoderLayer)


def thread_safe(*models: Any) -> bool:
    """Whether calls of these models from several threads at once give the same numbers as calls one at a time.

    True for :class:`FunctionalModel` instances whose module draws no random numbers (no dropout with ``p > 0`` in
    training mode: the draws of concurrent tasks would interleave in a different order on every run) and has no
    attention layers (their fused kernels are switched by process-wide flags). Any other callable is assumed unsafe:
    a plain ``torch.func.functional_call`` on a shared module is not.

    Example:
        >>> model, params = functionalize(nn.Sequential(nn.Linear(2, 4), nn.ReLU()))
        >>> thread_safe(model)
        True
        >>> thread_safe(lambda p, x: x)
        False
    """
    for model in models:
        if not isinstance(model, FunctionalModel):
            return False
        for m in model.module.modules():
            if isinstance(m, _SHARED_STATE_MODULES):
                return False
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
                return False
    return True


def checked_inputs(params: Params, tasks: Task, model: Any, select: Callable[[Params], Params], *, caller: str,
                   batched: bool = True) -> tuple[Task, Params]:
    """The checks every learner runs first: the parameter names, the task's structure, the parameters the model
    takes (``select(params)``: no key it does not take) and the tasks' dtype against theirs; returns the checked
    tasks and the model's parameters.

    Example:
        >>> model, params = functionalize(torch.nn.Linear(2, 3))
        >>> tasks = Task(torch.zeros(1, 3, 2), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, 2),
        ...              torch.zeros(1, 3, dtype=torch.long))
        >>> sorted(checked_inputs(params, tasks, model, lambda p: p, caller="demo")[1])
        ['bias', 'weight']
    """
    check_params(params, model, caller=caller)
    tasks = check_task(tasks, caller=caller, batched=batched)
    own = select(params)
    check_params(own, model, caller=caller, exact=True)
    check_task_dtypes(own, tasks, caller=caller)
    return tasks, own
