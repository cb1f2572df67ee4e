"""Turn an ``nn.Module`` into a pure function over a parameter dict, without mutating the module."""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metafunc.core.types import Params
from metafunc.nn.norm import find_torch_norm_layers

__all__ = ["FunctionalModel", "functionalize", "check_params", "thread_safe"]


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
    as it was. Buffers (running statistics, constants) are copied into the model as constants.

    Example:
        >>> model, params = functionalize(nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1)))
        >>> sorted(params)
        ['0.bias', '0.weight', '2.bias', '2.weight']
        >>> opt = torch.optim.Adam(params.values(), lr=1e-3)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"functionalize: module must be an nn.Module (got {type(module).__name__})")
    model = FunctionalModel(module)
    return model, model.init_params()


def check_params(params: Any, model: Any, *, caller: str) -> None:
    """Raise a clear error when ``params`` is not a dict of tensors matching ``model``'s parameter names.

    Extra keys are allowed (Meta-SGD's learning rates live next to the model's weights); missing ones are not.

    Example:
        >>> model, params = functionalize(nn.Linear(2, 1))
        >>> check_params(params, model, caller="maml")
    """
    if not isinstance(params, dict):
        raise TypeError(f"{caller}: params must be a dict of tensors, as returned by functionalize (got {type(params).__name__})")
    bad = [k for k, v in params.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"{caller}: params must hold tensors; {bad[:5]} are not")
    names = getattr(model, "param_names", None)
    if names is not None:
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(
                f"{caller}: params is missing {missing[:6]}{' ...' if len(missing) > 6 else ''}; "
                "pass the dict returned by functionalize(module) (or learner.init(params))"
            )


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
