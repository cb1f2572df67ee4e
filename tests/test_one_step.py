"""The one-step (lazy) approximation: exactly MAML at k = 1, exactly its formula for k > 1, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metafunc import Task, fomaml, functionalize, learner_for_path, maml, meta_batch, models, one_step
from metafunc.core.tree import tree_relative_error

LR = 0.3


def _net() -> nn.Module:
    return models.mlp(in_features=4, hidden=(6,), out_features=3, norm="batch")


def _tasks(n: int = 3, shots: int = 6) -> Task:
    g = torch.Generator().manual_seed(4)
    return Task(torch.randn(n, shots, 4, generator=g), torch.randint(0, 3, (n, shots), generator=g),
                torch.randn(n, shots, 4, generator=g), torch.randint(0, 3, (n, shots), generator=g))


def _meta_gradient(learner, params, tasks, mode):
    loss, metrics = meta_batch(learner.meta_loss, mode=mode)(params, tasks)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())))), loss, metrics


def _ce(module, p, x, y):
    return F.cross_entropy(functional_call(module, p, (x,)), y)


def reference_one_step_gradient(module, params, tasks, *, lr, steps):
    """Plain autograd: phi_k by k SGD steps without a graph, then g = grad L_q(phi_k) - lr * H_s(theta) grad L_q(phi_k)
    (the Hessian-vector product by double backward at theta), mean over tasks."""
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(tasks.num_tasks):
        t = tasks.task_at(i)
        phi = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        for _ in range(steps):
            grads = torch.autograd.grad(_ce(module, phi, t.support_x, t.support_y), list(phi.values()))
            phi = {k: (v - lr * g).detach().requires_grad_(True) for (k, v), g in zip(phi.items(), grads)}
        gq = torch.autograd.grad(_ce(module, phi, t.query_x, t.query_y), list(phi.values()))
        theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        gs = torch.autograd.grad(_ce(module, theta, t.support_x, t.support_y), list(theta.values()), create_graph=True)
        hv = torch.autograd.grad(sum((a * b).sum() for a, b in zip(gs, gq)), list(theta.values()))
        for k, a, b in zip(params, gq, hv):
            out[k] += (a - lr * b) / tasks.num_tasks
    return out


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_one_step_equals_maml_at_one_step(float64, mode):
    model, params = functionalize(_net())
    tasks = _tasks()
    exact, exact_loss, _ = _meta_gradient(maml(model, inner_lr=LR, steps=1), params, tasks, "loop")
    got, loss, _ = _meta_gradient(one_step(model, inner_lr=LR, steps=1), params, tasks, mode)
    assert tree_relative_error(got, exact) < 1e-12
    assert torch.equal(loss, exact_loss) or torch.allclose(loss, exact_loss, rtol=1e-14, atol=0)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 5])
def test_one_step_matches_its_formula(float64, steps, mode):
    net = _net()
    model, params = functionalize(net)
    tasks = _tasks()
    reference = reference_one_step_gradient(net, params, tasks, lr=LR, steps=steps)
    got, loss, metrics = _meta_gradient(learner_for_path("one_step").build(model, inner_lr=LR, steps=steps), params, tasks, mode)
    assert tree_relative_error(got, reference) < 1e-10
    # the loss is the query loss after the full k-step inner loop, as for MAML
    exact_loss, _ = meta_batch(maml(model, inner_lr=LR, steps=steps).meta_loss, mode="loop")(params, tasks)
    assert torch.allclose(loss, exact_loss, rtol=1e-12, atol=0)
    assert set(metrics) == {"loss", "accuracy", "support_loss"}


def test_one_step_is_between_first_order_and_exact_but_neither(float64):
    model, params = functionalize(_net())
    tasks = _tasks()
    got, _, _ = _meta_gradient(one_step(model, inner_lr=LR, steps=5), params, tasks, "vmap")
    exact, _, _ = _meta_gradient(maml(model, inner_lr=LR, steps=5), params, tasks, "vmap")
    first, _, _ = _meta_gradient(fomaml(model, inner_lr=LR, steps=5), params, tasks, "vmap")
    assert tree_relative_error(got, exact) > 1e-6
    assert tree_relative_error(got, first) > 1e-6


def test_bad_arguments():
    model, _ = functionalize(_net())
    with pytest.raises(ValueError, match=r"one_step: steps must be >= 1 \(got 0\)"):
        one_step(model, inner_lr=0.1, steps=0)
    with pytest.raises(ValueError, match=r"one_step: inner_lr must be > 0 \(got 0\)"):
        one_step(model, inner_lr=0, steps=2)
