"""Plain ``torch.autograd`` references for every gradient path, written without metafunc's code.

Everything here works on the ``nn.Module`` itself through :func:`torch.func.functional_call`, loops over tasks in
Python, and differentiates with ``torch.autograd.grad(create_graph=True)``. The modules it is run on are built from
torch's own layers (:func:`torch_conv4`, :func:`torch_mlp`: ``nn.BatchNorm2d(track_running_stats=False)``,
``nn.GroupNorm``, ``nn.InstanceNorm2d``, ``nn.LayerNorm``), never from metafunc's, and results are judged with
:func:`relative_error`, written here, so a bug in metafunc's norm layers or tree helpers cannot pass. Other
engineers' tests import it:

    >>> from reference import reference_meta_gradient   # pytest puts tests/ on sys.path
    >>> grads = reference_meta_gradient(module, params, tasks, algorithm="maml", inner_lr=0.1, steps=1,
    ...                                 loss="cross_entropy")

``params`` is a dict ``name -> tensor`` (any tensors; they are cloned into fresh leaves); for Meta-SGD it also holds
the learning rates under ``"inner_lr/" + name``. The result is a dict with the same keys: the gradient of the mean
over tasks of the per-task objective (zeros for a parameter the objective does not depend on).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "ALGORITHMS",
    "LR_PREFIX",
    "reference_adapt",
    "reference_task_objective",
    "reference_meta_objective",
    "reference_meta_gradient",
    "reference_meta_loss_value",
    "finite_difference_gradient",
    "loss_function",
    "relative_error",
    "torch_conv4",
    "torch_mlp",
]


def relative_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """``||got - want|| / ||want||`` over every entry of two dicts with the same keys (a missing key fails)."""
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:6]
    num = sum(float(((got[k].double() - want[k].double()) ** 2).sum()) for k in want)
    den = sum(float((want[k].double() ** 2).sum()) for k in want)
    return (num ** 0.5) / max(den ** 0.5, 1e-300)


class _Classifier(nn.Module):
    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def torch_conv4(ways: int, *, width: int = 4, image_size: int = 28, norm: str = "batch") -> nn.Module:
    """Conv-4 (3x3 conv, norm, ReLU, 2x2 max-pool; four times) and a linear ``head``, from torch's layers only:
    ``norm`` is ``"batch"`` (``nn.BatchNorm2d(track_running_stats=False)``, batch statistics as in MAML),
    ``"group"`` (``nn.GroupNorm(2, width)``) or ``"instance"`` (``nn.InstanceNorm2d(affine=True)``)."""
    def norm_layer() -> nn.Module:
        return {"batch": lambda: nn.BatchNorm2d(width, track_running_stats=False),
                "group": lambda: nn.GroupNorm(2, width),
                "instance": lambda: nn.InstanceNorm2d(width, affine=True)}[norm]()

    layers: list[nn.Module] = []
    channels, size = 1, image_size
    for _ in range(4):
        layers += [nn.Conv2d(channels, width, 3, padding=1), norm_layer(), nn.ReLU(), nn.MaxPool2d(2)]
        channels, size = width, size // 2
    return _Classifier(nn.Sequential(*layers, nn.Flatten()), nn.Linear(width * size * size, ways))


def torch_mlp(in_features: int, hidden: Sequence[int], out_features: int, *, layer_norm: bool = False) -> nn.Module:
    """A ReLU MLP with ``nn.LayerNorm`` after each hidden linear layer (``layer_norm=True``) and a linear ``head``."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h)] + ([nn.LayerNorm(h)] if layer_norm else []) + [nn.ReLU()]
        width = h
    return _Classifier(nn.Sequential(*layers), nn.Linear(width, out_features))

ALGORITHMS = ("maml", "fomaml", "anil", "boil", "meta_sgd", "reptile")
LR_PREFIX = "inner_lr/"  # Meta-SGD's learning-rate names, spelled here on purpose (not imported from metafunc)


def loss_function(loss: str | Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``"mse"``, ``"cross_entropy"`` or a callable ``loss(prediction, target)``."""
    if callable(loss):
        return loss
    return {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}[loss]


def _is_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def _adapted_names(algorithm: str, names: Sequence[str], head: str) -> list[str]:
    if algorithm == "anil":
        return [n for n in names if _is_head(n, head)]
    if algorithm == "boil":
        return [n for n in names if not _is_head(n, head)]
    return list(names)


def reference_adapt(
    module: nn.Module,
    params: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    algorithm: str,
    inner_lr: float,
    steps: int,
    loss: str | Callable = "cross_entropy",
    head: str = "head",
    lrs: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``steps`` SGD steps on ``(x, y)``, differentiable (second order) unless the algorithm is first order."""
    loss_fn = loss_function(loss)
    second_order = algorithm in ("maml", "anil", "boil", "meta_sgd")
    names = _adapted_names(algorithm, list(params), head)
    fast = dict(params)
    for _ in range(steps):
        support_loss = loss_fn(functional_call(module, fast, (x,)), y)
        grads = torch.autograd.grad(support_loss, [fast[n] for n in names], create_graph=second_order)
        new = dict(fast)
        for n, g in zip(names, grads):
            if not second_order:
                g = g.detach()
            lr = lrs[n] if algorithm == "meta_sgd" else inner_lr
            new[n] = fast[n] - lr * g
        fast = new
    return fast


def reference_task_objective(
    module: nn.Module,
    params: dict[str, Tensor],
    task: Sequence[Tensor],
    *,
    algorithm: str,
    inner_lr: float,
    steps: int,
    loss: str | Callable = "cross_entropy",
    head: str = "head",
) -> Tensor:
    """One task's differentiated objective: the query loss after adaptation (Reptile: ``0.5||theta - phi||^2``)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"reference: unknown algorithm {algorithm!r}")
    support_x, support_y, query_x, query_y = task
    weights = {k: v for k, v in params.items() if not k.startswith(LR_PREFIX)}
    lrs = {k[len(LR_PREFIX):]: v for k, v in params.items() if k.startswith(LR_PREFIX)}
    phi = reference_adapt(module, weights, support_x, support_y, algorithm=algorithm, inner_lr=inner_lr,
                          steps=steps, loss=loss, head=head, lrs=lrs)
    if algorithm == "reptile":
        return 0.5 * sum(((weights[k] - phi[k].detach()) ** 2).sum() for k in weights)
    if algorithm == "fomaml":
        # d phi / d theta = I: re-attach the adapted values to theta.
        phi = {k: weights[k] + (phi[k] - weights[k]).detach() for k in weights}
    return loss_function(loss)(functional_call(module, phi, (query_x,)), query_y)


def _leaves(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def reference_meta_objective(module: nn.Module, params: dict[str, Tensor], tasks: Sequence[Tensor], **kwargs) -> Tensor:
    """The mean over the meta-batch (tasks stacked along dim 0) of :func:`reference_task_objective`."""
    n = tasks[0].shape[0]
    total = sum(reference_task_objective(module, params, [t[i] for t in tasks], **kwargs) for i in range(n))
    return total / n  # type: ignore[operator]


def reference_meta_gradient(
    module: nn.Module,
    params: dict[str, Tensor],
    tasks: Sequence[Tensor],
    **kwargs,
) -> dict[str, Tensor]:
    """The meta-gradient of :func:`reference_meta_objective`, one ``torch.autograd.grad`` over a Python loop.

    ``kwargs``: ``algorithm`` (one of :data:`ALGORITHMS`), ``inner_lr``, ``steps``, ``loss``, ``head``.
    """
    leaves = _leaves(params)
    with sdpa_kernel([SDPBackend.MATH]):  # torch's fused attention kernels have no double backward
        objective = reference_meta_objective(module, leaves, tasks, **kwargs)
        grads = torch.autograd.grad(objective, list(leaves.values()), allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(leaves.items(), grads)}


def reference_meta_loss_value(module: nn.Module, params: dict[str, Tensor], tasks: Sequence[Tensor], **kwargs) -> float:
    """The value of :func:`reference_meta_objective` at ``params`` (fresh leaves are made, so any tensors do)."""
    with sdpa_kernel([SDPBackend.MATH]):
        return float(reference_meta_objective(module, _leaves(params), tasks, **kwargs).detach())


def finite_difference_gradient(
    fn: Callable[[dict[str, Tensor]], float | Tensor],
    params: dict[str, Tensor],
    *,
    eps: float = 1e-6,
) -> dict[str, Tensor]:
    """Central differences ``(f(p + eps e_i) - f(p - eps e_i)) / 2 eps`` of a scalar ``fn(params)``, entry by entry.

    Use float64 and tiny models (two evaluations per parameter entry). ``fn`` may differentiate internally (a
    second-order inner loop): it gets plain tensors and should make its own leaves, e.g.
    ``lambda p: reference_meta_loss_value(module, p, tasks, algorithm="maml", inner_lr=0.1, steps=2, loss="mse")``.
    """
    base = {k: v.detach().clone() for k, v in params.items()}
    out: dict[str, Tensor] = {}
    for name, value in base.items():
        grad = torch.zeros_like(value)
        flat = grad.reshape(-1)
        for i in range(value.numel()):
            plus, minus = value.clone(), value.clone()
            plus.reshape(-1)[i] += eps
            minus.reshape(-1)[i] -= eps
            f_plus = float(fn({**base, name: plus}))
            f_minus = float(fn({**base, name: minus}))
            flat[i] = (f_plus - f_minus) / (2 * eps)
        out[name] = grad
    return out
