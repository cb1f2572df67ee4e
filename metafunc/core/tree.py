"""Small helpers for flat dicts of tensors (the parameter trees of metafunc)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from metafunc.core.types import Params, Selector

__all__ = [
    "selector_predicate",
    "tree_straight_through",
    "tree_map",
    "tree_add",
    "tree_sub",
    "tree_scale",
    "tree_axpy",
    "tree_zeros_like",
    "tree_detach",
    "tree_dot",
    "tree_norm",
    "tree_flatten",
    "tree_relative_error",
    "tree_allclose",
    "select",
    "partition",
    "combine",
]


def tree_map(fn: Callable[..., Tensor], tree: Params, *rest: Params) -> Params:
    """Apply ``fn`` leaf by leaf over trees with the same keys.

    Example:
        >>> tree_map(lambda a, b: a + b, {"w": torch.ones(2)}, {"w": torch.ones(2)})["w"]
        tensor([2., 2.])
    """
    for other in rest:
        if other.keys() != tree.keys():
            missing = sorted(set(tree) ^ set(other))
            raise ValueError(f"tree_map: the trees have different keys (differing: {missing})")
    return {k: fn(v, *(o[k] for o in rest)) for k, v in tree.items()}


def tree_add(a: Params, b: Params) -> Params:
    """``a + b`` leaf by leaf.

    Example:
        >>> tree_add({"w": torch.ones(1)}, {"w": torch.ones(1)})
        {'w': tensor([2.])}
    """
    return tree_map(torch.add, a, b)


def tree_sub(a: Params, b: Params) -> Params:
    """``a - b`` leaf by leaf.

    Example:
        >>> tree_sub({"w": torch.ones(1)}, {"w": torch.ones(1)})
        {'w': tensor([0.])}
    """
    return tree_map(torch.sub, a, b)


def tree_scale(a: Params, s: float | Tensor) -> Params:
    """``s * a`` leaf by leaf.

    Example:
        >>> tree_scale({"w": torch.ones(1)}, 3.0)
        {'w': tensor([3.])}
    """
    return {k: v * s for k, v in a.items()}


def tree_axpy(alpha: float | Tensor, x: Params, y: Params) -> Params:
    """``alpha * x + y`` leaf by leaf.

    Example:
        >>> tree_axpy(2.0, {"w": torch.ones(1)}, {"w": torch.ones(1)})
        {'w': tensor([3.])}
    """
    return tree_map(lambda a, b: alpha * a + b, x, y)


def tree_zeros_like(a: Params) -> Params:
    """Zeros shaped like each leaf.

    Example:
        >>> tree_zeros_like({"w": torch.ones(2)})
        {'w': tensor([0., 0.])}
    """
    return {k: torch.zeros_like(v) for k, v in a.items()}


def tree_detach(a: Params) -> Params:
    """Detach every leaf (a stop-gradient at every transform level).

    Example:
        >>> tree_detach({"w": torch.ones(1, requires_grad=True)})["w"].requires_grad
        False
    """
    return {k: v.detach() for k, v in a.items()}


def tree_dot(a: Params, b: Params) -> Tensor:
    """Sum over leaves of the elementwise product.

    Example:
        >>> tree_dot({"w": torch.ones(3)}, {"w": torch.ones(3)})
        tensor(3.)
    """
    if a.keys() != b.keys():
        raise ValueError(f"tree_dot: the trees have different keys (differing: {sorted(set(a) ^ set(b))})")
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def tree_norm(a: Params) -> Tensor:
    """Euclidean norm of the whole tree.

    Example:
        >>> tree_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
        tensor(5.)
    """
    return torch.sqrt(sum((v * v).sum() for v in a.values()))  # type: ignore[arg-type]


def tree_flatten(a: Params) -> Tensor:
    """All leaves concatenated into one vector, in key order.

    Example:
        >>> tree_flatten({"a": torch.ones(2), "b": torch.zeros(1)})
        tensor([1., 1., 0.])
    """
    return torch.cat([v.reshape(-1) for v in a.values()])


def tree_relative_error(a: Params, reference: Params) -> float:
    """``||a - reference|| / ||reference||`` over the whole tree (a leaf whose true value is 0 does not blow it up).

    Example:
        >>> tree_relative_error({"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([1.0, 2.0])})
        0.4472135954999579
    """
    if a.keys() != reference.keys():
        raise ValueError(f"tree_relative_error: the trees have different keys (differing: {sorted(set(a) ^ set(reference))})")
    x = torch.cat([a[k].detach().reshape(-1).to(torch.float64) for k in reference])
    r = torch.cat([reference[k].detach().reshape(-1).to(torch.float64) for k in reference])
    denominator = r.norm().item()
    numerator = (x - r).norm().item()
    return numerator / denominator if denominator > 0 else numerator


def tree_allclose(a: Params, b: Params, *, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    """True when both trees have the same keys and every leaf is close.

    Example:
        >>> tree_allclose({"w": torch.ones(1)}, {"w": torch.ones(1)})
        True
    """
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a)


def selector_predicate(selector: Selector, caller: str = "select") -> Callable[[str], bool]:
    """The predicate on parameter names that ``selector`` stands for: ``None`` (every name), a name prefix (whole
    dotted components), a sequence of prefixes, or a predicate itself.

    Example:
        >>> is_head = selector_predicate("head")
        >>> is_head("head.weight"), is_head("header.weight")
        (True, False)
    """
    if selector is None:
        return lambda name: True
    if callable(selector):
        return selector
    if isinstance(selector, str):
        prefixes: tuple[str, ...] = (selector,)
    elif isinstance(selector, (list, tuple)) and all(isinstance(s, str) for s in selector):
        prefixes = tuple(selector)
    else:
        raise TypeError(
            f"{caller}: a parameter selector must be None, a name prefix, a list of prefixes or a predicate on names "
            f"(got {selector!r})"
        )

    def matches(name: str) -> bool:
        return any(name == p or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)

    return matches


def select(params: Params, selector: Selector, *, caller: str = "select") -> list[str]:
    """Names of the parameters chosen by ``selector`` (a prefix matches whole dotted components).

    Raises ``ValueError`` when the selector chooses nothing, which is almost always a typo.

    Example:
        >>> select({"body.0.weight": torch.ones(1), "head.weight": torch.ones(1)}, "head")
        ['head.weight']
    """
    pred = selector_predicate(selector, caller)
    names = [k for k in params if pred(k)]
    if not names:
        raise ValueError(
            f"{caller}: the parameter selector {selector!r} matches no parameter; "
            f"the names are {sorted(params)[:8]}{' ...' if len(params) > 8 else ''}"
        )
    return names


def partition(params: Params, selector: Selector) -> tuple[Params, Params]:
    """Split into ``(selected, rest)``; :func:`combine` undoes it.

    Example:
        >>> a, b = partition({"body.w": torch.ones(1), "head.w": torch.zeros(1)}, "head")
        >>> list(a), list(b)
        (['head.w'], ['body.w'])
    """
    names = set(select(params, selector, caller="partition"))
    return {k: v for k, v in params.items() if k in names}, {k: v for k, v in params.items() if k not in names}


def combine(*trees: Params) -> Params:
    """Merge disjoint trees (later trees win on a shared key).

    Example:
        >>> sorted(combine({"a": torch.ones(1)}, {"b": torch.ones(1)}))
        ['a', 'b']
    """
    out: Params = {}
    for t in trees:
        out.update(t)
    return out


def tree_straight_through(surrogate: Params, value: Params) -> Params:
    """``surrogate + stopgrad(value - surrogate)`` leaf by leaf: the values of ``value`` with the gradient of
    ``surrogate`` (keys of ``value`` missing from ``surrogate`` pass through unchanged).

    The straight-through rewrite of first-order MAML (``d phi / d theta = I``), the one-step and implicit paths, and
    ProtoMAML's output layer (``phi = gamma + stopgrad(phi - gamma)``).

    Example:
        >>> theta = {"w": torch.tensor(1.0, requires_grad=True)}
        >>> phi = tree_straight_through(theta, {"w": torch.tensor(5.0)})
        >>> phi["w"].item(), torch.autograd.grad(3 * phi["w"], theta["w"])[0].item()
        (5.0, 3.0)
    """
    return {k: surrogate[k] + (v - surrogate[k]).detach() if k in surrogate else v for k, v in value.items()}
