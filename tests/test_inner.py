"""inner_loop and first_order: the adaptation transform."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metafunc import first_order, functionalize, inner_loop, models, sgd_step
from metafunc.core.tree import tree_relative_error

f64 = torch.float64


def _problem():
    torch.manual_seed(0)
    net = models.mlp(2, (6,), 1, norm="layer").to(f64)
    model, params = functionalize(net)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 2, generator=g, dtype=f64), torch.randn(8, 1, generator=g, dtype=f64)

    def task_loss(p, x, y):
        return F.mse_loss(model(p, x), y)

    return net, model, params, x, y, task_loss


def _manual_sgd(task_loss, params, x, y, lr, steps, names):
    fast = {k: v.detach().clone() for k, v in params.items()}
    losses = []
    for _ in range(steps):
        leaves = {k: v.clone().requires_grad_(k in names) for k, v in fast.items()}
        loss = task_loss(leaves, x, y)
        grads = torch.autograd.grad(loss, [leaves[k] for k in names])
        losses.append(loss.detach())
        rate = (lambda k: lr[k]) if isinstance(lr, dict) else (lambda k: lr)
        fast = {k: (v - rate(k) * grads[names.index(k)] if k in names else v) for k, v in fast.items()}
    return fast, torch.stack(losses)


def test_adapted_params_and_losses_per_step_equal_plain_sgd():
    _, _, params, x, y, task_loss = _problem()
    adapt = inner_loop(task_loss, steps=4, lr=0.1)
    fast, losses = adapt(params, x, y)
    expected, expected_losses = _manual_sgd(task_loss, params, x, y, 0.1, 4, list(params))
    assert losses.shape == (4,) and not losses.requires_grad
    assert torch.allclose(losses, expected_losses, rtol=1e-12)
    assert losses[-1] < losses[0]  # support loss taken before each step, and it decreases
    assert tree_relative_error(fast, expected) < 1e-12
    assert list(fast) == list(params)


def test_call_time_steps_and_lr_override_the_defaults():
    _, _, params, x, y, task_loss = _problem()
    adapt = inner_loop(task_loss, steps=1, lr=0.1)
    fast, losses = adapt(params, x, y, steps=3, lr=0.05)
    expected, _ = _manual_sgd(task_loss, params, x, y, 0.05, 3, list(params))
    assert losses.shape == (3,)
    assert tree_relative_error(fast, expected) < 1e-12


@pytest.mark.parametrize("selector, adapted", [
    ("head", ["head.weight", "head.bias"]),
    (["body.0"], ["body.0.weight", "body.0.bias"]),
    (lambda name: name.endswith("bias"), ["body.0.bias", "body.1.bias", "head.bias"]),
], ids=["prefix", "list", "predicate"])
def test_subset_adaptation_leaves_the_other_parameters_untouched(selector, adapted):
    _, _, params, x, y, task_loss = _problem()
    fast, _ = inner_loop(task_loss, steps=2, lr=0.2, adapt=selector)(params, x, y)
    expected, _ = _manual_sgd(task_loss, params, x, y, 0.2, 2, adapted)
    for name in params:
        if name in adapted:
            assert not torch.equal(fast[name], params[name]), name
        else:
            assert fast[name] is params[name], name  # the very same tensor, not a copy
    assert tree_relative_error(fast, expected) < 1e-12


def test_per_parameter_learning_rate_dict():
    _, _, params, x, y, task_loss = _problem()
    g = torch.Generator().manual_seed(2)
    lrs = {k: 0.2 * torch.rand(v.shape, generator=g, dtype=f64) for k, v in params.items()}
    fast, _ = inner_loop(task_loss, steps=2)(params, x, y, lr=lrs)
    expected, _ = _manual_sgd(task_loss, params, x, y, lrs, 2, list(params))
    assert tree_relative_error(fast, expected) < 1e-12


def test_second_order_by_default_and_first_order_on_request():
    _, _, params, x, y, task_loss = _problem()
    query = lambda p: task_loss(p, x[:4] * 2, y[:4])  # noqa: E731
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    second = torch.autograd.grad(query(inner_loop(task_loss, steps=2, lr=0.3)(leaves, x, y)[0]), list(leaves.values()))
    flag = torch.autograd.grad(query(inner_loop(task_loss, steps=2, lr=0.3, first_order=True)(leaves, x, y)[0]),
                               list(leaves.values()))
    wrapped_fast, _ = first_order(inner_loop(task_loss, steps=2, lr=0.3))(leaves, x, y)
    wrapped = torch.autograd.grad(query(wrapped_fast), list(leaves.values()))
    # first order: the query gradient at the adapted parameters
    fast, _ = inner_loop(task_loss, steps=2, lr=0.3)(leaves, x, y)
    at_fast = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
    direct = torch.autograd.grad(query(at_fast), list(at_fast.values()))
    names = list(params)
    as_tree = lambda gs: dict(zip(names, gs))  # noqa: E731
    assert tree_relative_error(as_tree(flag), as_tree(direct)) < 1e-12
    assert tree_relative_error(as_tree(wrapped), as_tree(direct)) < 1e-12
    assert tree_relative_error(as_tree(second), as_tree(direct)) > 1e-3


def test_first_order_keeps_the_values_of_the_wrapped_adaptation():
    _, _, params, x, y, task_loss = _problem()
    inner = inner_loop(task_loss, steps=3, lr=0.1, adapt="head")
    fast, losses = inner(params, x, y)
    fo_fast, fo_losses = first_order(inner)(params, x, y)
    assert tree_relative_error(fo_fast, fast) < 1e-15 and torch.equal(losses, fo_losses)
    assert first_order(inner).__name__ == "adapt"


def test_inner_loop_composes_with_vmap_over_tasks():
    _, _, params, x, y, task_loss = _problem()
    xs, ys = torch.stack([x, x + 1]), torch.stack([y, -y])
    adapt = inner_loop(task_loss, steps=2, lr=0.1)
    batched, losses = torch.func.vmap(lambda a, b: adapt(params, a, b))(xs, ys)
    for i in range(2):
        single, single_losses = adapt(params, xs[i], ys[i])
        assert tree_relative_error({k: v[i] for k, v in batched.items()}, single) < 1e-12
        assert torch.allclose(losses[i], single_losses, rtol=1e-12)


def test_sgd_step_only_moves_the_keys_of_grads():
    params = {"a": torch.ones(2), "b": torch.ones(2)}
    out = sgd_step(params, {"a": torch.full((2,), 2.0)}, 0.25)
    assert torch.equal(out["a"], torch.full((2,), 0.5)) and out["b"] is params["b"]
    out = sgd_step(params, {"b": torch.ones(2)}, {"b": torch.tensor([1.0, 0.5])})
    assert torch.equal(out["b"], torch.tensor([0.0, 0.5]))
