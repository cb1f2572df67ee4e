"""Turn an ``nn.Module`` into a pure function over a parameter dict, without mutating the module."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._types import Params
from .norm import find_torch_norm_layers

__all__ = ["FunctionalModel", "functionalize", "check_params"]


class FunctionalModel:
    """A module seen as a pure function ``model(params, x)``; buffers are held as constants.

    The wrapped module is never mutated: each call goes through :func:`torch.func.functional_call` with
    ``strict=True``, so a missing or extra parameter is an error rather than a silent fall-back to the module's own
    weights. ``torch_norm_layers`` lists torch norm layers that would give wrong second-order gradients under
    ``vmap``; the algorithms refuse such a model when they would be vmapped at second order.

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

    def __call__(self, params: Params, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        state = {**params, **self.buffers} if self.buffers else params
        return functional_call(self.module, state, (x, *args), kwargs, strict=True)

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
