"""The tree helpers over flat dicts of tensors."""

from __future__ import annotations

import math

import pytest
import torch

from metafunc.core.tree import (
    combine,
    partition,
    select,
    tree_add,
    tree_allclose,
    tree_axpy,
    tree_detach,
    tree_dot,
    tree_flatten,
    tree_map,
    tree_norm,
    tree_relative_error,
    tree_scale,
    tree_sub,
    tree_zeros_like,
)


def _trees():
    a = {"body.0.weight": torch.tensor([[1.0, 2.0]]), "head.bias": torch.tensor([3.0])}
    b = {"body.0.weight": torch.tensor([[0.5, -1.0]]), "head.bias": torch.tensor([2.0])}
    return a, b


def test_arithmetic_leaf_by_leaf():
    a, b = _trees()
    assert torch.equal(tree_add(a, b)["body.0.weight"], torch.tensor([[1.5, 1.0]]))
    assert torch.equal(tree_sub(a, b)["head.bias"], torch.tensor([1.0]))
    assert torch.equal(tree_scale(a, 2.0)["head.bias"], torch.tensor([6.0]))
    assert torch.equal(tree_axpy(-2.0, b, a)["body.0.weight"], torch.tensor([[0.0, 4.0]]))
    assert torch.equal(tree_zeros_like(a)["body.0.weight"], torch.zeros(1, 2))
    assert tree_map(lambda x, y, z: x + y + z, a, b, a)["head.bias"].item() == 8.0
    assert list(tree_add(a, b)) == list(a)  # key order kept


def test_reductions():
    a, b = _trees()
    assert tree_dot(a, b).item() == pytest.approx(0.5 - 2.0 + 6.0)
    assert tree_norm(a).item() == pytest.approx(math.sqrt(1 + 4 + 9))
    assert torch.equal(tree_flatten(a), torch.tensor([1.0, 2.0, 3.0]))


def test_mismatched_keys_name_the_differing_keys():
    a, _ = _trees()
    other = {"body.0.weight": torch.ones(1, 2), "head.weight": torch.ones(1)}
    with pytest.raises(ValueError, match=r"^tree_map: the trees have different keys \(differing: \['head.bias', "
                                         r"'head.weight'\]\)"):
        tree_add(a, other)
    with pytest.raises(ValueError, match=r"^tree_dot: the trees have different keys"):
        tree_dot(a, other)
    with pytest.raises(ValueError, match=r"^tree_relative_error: the trees have different keys"):
        tree_relative_error(a, other)


def test_relative_error_is_over_the_whole_tree():
    ref = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0])}  # a leaf that is exactly 0
    close = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4e-12])}
    assert tree_relative_error(close, ref) == pytest.approx(4e-12 / 3.0)
    assert tree_relative_error(ref, ref) == 0.0
    assert tree_relative_error({"w": torch.ones(2)}, {"w": torch.zeros(2)}) == pytest.approx(math.sqrt(2))
    # float32 inputs are compared in float64
    assert tree_relative_error({"w": torch.tensor([1.0], dtype=torch.float32)},
                               {"w": torch.tensor([1.0], dtype=torch.float64)}) == 0.0


def test_allclose_and_detach():
    a, b = _trees()
    assert tree_allclose(a, {k: v.clone() for k, v in a.items()})
    assert not tree_allclose(a, b)
    assert not tree_allclose(a, {"body.0.weight": a["body.0.weight"]})
    leaf = {"w": torch.ones(2, requires_grad=True)}
    detached = tree_detach(tree_scale(leaf, 2.0))
    assert not detached["w"].requires_grad and torch.equal(detached["w"], torch.full((2,), 2.0))


def test_select_partition_combine():
    params = {"body.0.weight": torch.ones(1), "body.10.weight": torch.ones(1), "head.weight": torch.ones(1),
              "header.bias": torch.ones(1)}
    assert select(params, "head") == ["head.weight"]  # a prefix matches whole dotted components
    assert select(params, "body.10") == ["body.10.weight"]
    assert select(params, ["head", "header"]) == ["head.weight", "header.bias"]
    assert select(params, lambda n: n.endswith("bias")) == ["header.bias"]
    assert select(params, None) == list(params)
    with pytest.raises(ValueError, match=r"^select: the parameter selector 'body.1' matches no parameter"):
        select(params, "body.1")
    with pytest.raises(TypeError, match=r"^select: a parameter selector must be None, a name prefix"):
        select(params, 3)  # type: ignore[arg-type]
    head, rest = partition(params, "head")
    assert list(head) == ["head.weight"] and list(rest) == ["body.0.weight", "body.10.weight", "header.bias"]
    assert set(combine(head, rest)) == set(params)
    assert combine({"a": torch.zeros(1)}, {"a": torch.ones(1)})["a"].item() == 1.0


def test_tree_helpers_compose_with_torch_func():
    params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5)}
    grads = torch.func.grad(lambda p: tree_dot(p, p))(params)
    assert tree_allclose(grads, tree_scale(params, 2.0))
    batched = torch.func.vmap(lambda p: tree_norm(p))({"w": torch.ones(3, 2), "b": torch.zeros(3)})
    assert torch.allclose(batched, torch.full((3,), math.sqrt(2)))
