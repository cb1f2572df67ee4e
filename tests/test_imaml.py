"""iMAML and the conjugate-gradient solver: closed forms on a quadratic, an explicit-Hessian reference on a model
with BatchNorm, and convergence to the unrolled gradient, all in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metafunc import Task, functionalize, learner_for_path, meta_batch, models
from metafunc.core.tree import tree_relative_error
from metafunc.gradients import conjugate_gradient, imaml, proximal_inner_loop


def _meta_gradient(learner, params, tasks, mode):
    loss, metrics = meta_batch(learner.meta_loss, mode=mode)(params, tasks)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())))), loss, metrics


# ---------------------------------------------------------------- conjugate gradient


def test_conjugate_gradient_solves_spd_system(float64):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g)
    a = m @ m.T + 0.5 * torch.eye(6)
    b = torch.randn(6, generator=g)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=6)
    assert torch.allclose(x, torch.linalg.solve(a, b), rtol=0, atol=1e-10)
    damped = conjugate_gradient(lambda v: a @ v, b, iterations=6, damping=0.3)
    assert torch.allclose(damped, torch.linalg.solve(a + 0.3 * torch.eye(6), b), rtol=0, atol=1e-10)
    # a tree of tensors, split across two leaves; more iterations than dimensions stay exact (0/0 guarded)
    tree = conjugate_gradient(lambda t: {"u": (a @ torch.cat([t["u"], t["w"]]))[:2], "w": (a @ torch.cat([t["u"], t["w"]]))[2:]},
                              {"u": b[:2], "w": b[2:]}, iterations=12)
    assert torch.allclose(torch.cat([tree["u"], tree["w"]]), torch.linalg.solve(a, b), rtol=0, atol=1e-10)
    # few iterations on an ill-conditioned system are not converged: the iteration count matters
    rough = conjugate_gradient(lambda v: a @ v, b, iterations=1)
    assert not torch.allclose(rough, torch.linalg.solve(a, b), atol=1e-3)


def test_conjugate_gradient_bad_input():
    with pytest.raises(ValueError, match=r"conjugate_gradient: iterations must be >= 1 \(got 0\)"):
        conjugate_gradient(lambda v: v, torch.ones(2), iterations=0)
    with pytest.raises(ValueError, match=r"conjugate_gradient: damping must be >= 0 \(got -1\)"):
        conjugate_gradient(lambda v: v, torch.ones(2), iterations=2, damping=-1)
    with pytest.raises(TypeError, match="conjugate_gradient: matvec must be callable"):
        conjugate_gradient(None, torch.ones(2), iterations=2)


# ---------------------------------------------------------------- a quadratic inner problem, solved in closed form


def _regression_tasks(n=3, shots=8, dim=3):
    g = torch.Generator().manual_seed(2)
    return Task(torch.randn(n, shots, dim, generator=g), torch.randn(n, shots, 1, generator=g),
                torch.randn(n, shots, dim, generator=g), torch.randn(n, shots, 1, generator=g))


def closed_form_hypergradient(params, tasks, lam):
    """Linear model + MSE: L_s(phi) = 1/n ||Xa phi - y||^2, so phi*(theta) = (H + lam I)^-1 (r + lam theta) with
    H = 2/n Xa^T Xa and r = 2/n Xa^T y. Differentiate L_q(phi*(theta)) with autograd through the linear solve."""
    theta = torch.cat([params["weight"].detach().reshape(-1), params["bias"].detach()]).requires_grad_(True)
    total = 0.0
    for i in range(tasks.num_tasks):
        t = tasks.task_at(i)
        xs = torch.cat([t.support_x, torch.ones(len(t.support_x), 1)], 1)
        xq = torch.cat([t.query_x, torch.ones(len(t.query_x), 1)], 1)
        h = 2 / len(xs) * xs.T @ xs
        r = 2 / len(xs) * xs.T @ t.support_y[:, 0]
        phi = torch.linalg.solve(h + lam * torch.eye(len(theta)), r + lam * theta)
        total = total + ((xq @ phi - t.query_y[:, 0]) ** 2).mean()
    (g,) = torch.autograd.grad(total / tasks.num_tasks, theta)
    return {"weight": g[:3].reshape(1, 3), "bias": g[3:]}


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_implicit_gradient_equals_closed_form_on_quadratic(float64, mode):
    model, params = functionalize(nn.Linear(3, 1))
    tasks = _regression_tasks()
    lam = 1.0
    learner = imaml(model, inner_lr=0.1, steps=400, loss="mse", lam=lam, cg_iterations=4)
    got, _, _ = _meta_gradient(learner, params, tasks, mode)
    assert tree_relative_error(got, closed_form_hypergradient(params, tasks, lam)) < 1e-8


def test_adam_solver_reaches_the_proximal_optimum(float64):
    model, params = functionalize(nn.Linear(3, 1))
    tasks = _regression_tasks(1)
    t = tasks.task_at(0)
    task_loss = lambda p, x, y: F.mse_loss(model(p, x), y)  # noqa: E731
    sgd, _ = proximal_inner_loop(task_loss, steps=400, lr=0.1, lam=1.0)(params, t.support_x, t.support_y)
    adam, losses = proximal_inner_loop(task_loss, steps=1500, lr=0.01, lam=1.0, solver="adam")(
        params, t.support_x, t.support_y)
    assert losses.shape == (1500,)
    assert tree_relative_error(adam, sgd) < 1e-3
    assert tree_relative_error(params, sgd) > 1e-1  # the optimum is not the starting point


# ---------------------------------------------------------------- a model with BatchNorm: explicit-Hessian reference


def _net():
    return models.mlp(in_features=3, hidden=(4,), out_features=2, norm="batch")


def _class_tasks(n=2, shots=6):
    g = torch.Generator().manual_seed(3)
    return Task(torch.randn(n, shots, 3, generator=g), torch.randint(0, 2, (n, shots), generator=g),
                torch.randn(n, shots, 3, generator=g), torch.randint(0, 2, (n, shots), generator=g))


def _flat(params):
    return torch.cat([v.reshape(-1) for v in params.values()])


def _unflat(vec, like):
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i:i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def _plain_losses(module):
    def support(flat, like, t):
        return F.cross_entropy(functional_call(module, _unflat(flat, like), (t.support_x,)), t.support_y)

    def query(flat, like, t):
        return F.cross_entropy(functional_call(module, _unflat(flat, like), (t.query_x,)), t.query_y)

    return support, query


def reference_proximal_sgd(module, params, t, *, lr, lam, steps, create_graph):
    """Plain autograd: SGD on L_s(phi) + lam/2 ||phi - theta||^2 from phi = theta (theta a flat leaf)."""
    support, _ = _plain_losses(module)
    theta = _flat(params)
    phi = theta
    for _ in range(steps):
        (g,) = torch.autograd.grad(support(phi, params, t) + lam / 2 * ((phi - theta) ** 2).sum(), phi,
                                   create_graph=create_graph)
        phi = phi - lr * g
    return phi


def reference_implicit_gradient(module, params, tasks, *, lr, lam, steps):
    """The explicit Hessian of L_s at phi by double backward, then a dense solve of (I + H/lam) g = grad L_q."""
    support, query = _plain_losses(module)
    grads = []
    for i in range(tasks.num_tasks):
        t = tasks.task_at(i)
        theta = _flat(params).detach().requires_grad_(True)
        phi = reference_proximal_sgd(module, params, t, lr=lr, lam=lam, steps=steps, create_graph=False).detach()
        phi.requires_grad_(True)
        (gq,) = torch.autograd.grad(query(phi, params, t), phi)
        (gs,) = torch.autograd.grad(support(phi, params, t), phi, create_graph=True)
        hessian = torch.stack([torch.autograd.grad(gs[j], phi, retain_graph=True)[0] for j in range(len(phi))])
        grads.append(torch.linalg.solve(torch.eye(len(phi)) + hessian / lam, gq))
        del theta
    return _unflat(torch.stack(grads).mean(0), params)


def reference_unrolled_gradient(module, params, tasks, *, lr, lam, steps):
    """Plain autograd through the unrolled proximal SGD loop (create_graph=True), mean over tasks."""
    _, query = _plain_losses(module)
    theta = _flat(params).detach().requires_grad_(True)
    like = {k: v.detach() for k, v in params.items()}
    total = 0.0
    for i in range(tasks.num_tasks):
        t = tasks.task_at(i)
        support, _ = _plain_losses(module)
        phi = theta
        for _ in range(steps):
            (g,) = torch.autograd.grad(support(phi, like, t) + lam / 2 * ((phi - theta) ** 2).sum(), phi,
                                       create_graph=True)
            phi = phi - lr * g
        total = total + query(phi, like, t)
    (g,) = torch.autograd.grad(total / tasks.num_tasks, theta)
    return _unflat(g, like)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_implicit_gradient_equals_explicit_hessian_solve(float64, mode):
    net = _net()
    model, params = functionalize(net)
    tasks = _class_tasks()
    n = sum(v.numel() for v in params.values())
    learner = imaml(model, inner_lr=0.2, steps=20, lam=2.0, cg_iterations=n)
    got, loss, metrics = _meta_gradient(learner, params, tasks, mode)
    reference = reference_implicit_gradient(net, params, tasks, lr=0.2, lam=2.0, steps=20)
    assert tree_relative_error(got, reference) < 1e-10
    assert set(metrics) == {"loss", "accuracy", "support_loss"}


def test_implicit_gradient_approaches_unrolled_as_inner_problem_converges(float64):
    net = _net()
    model, params = functionalize(net)
    tasks = _class_tasks()
    n = sum(v.numel() for v in params.values())
    errors = []
    for steps in (5, 20, 80):
        learner = learner_for_path("implicit").build(model, inner_lr=0.2, steps=steps, lam=2.0, cg_iterations=n)
        got, _, _ = _meta_gradient(learner, params, tasks, "vmap")
        unrolled = reference_unrolled_gradient(net, params, tasks, lr=0.2, lam=2.0, steps=steps)
        errors.append(tree_relative_error(got, unrolled))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] > 1e-3   # a short inner loop is far from its fixed point ...
    assert errors[2] < 1e-8   # ... a converged one gives the implicit gradient


def test_fewer_cg_iterations_approximate(float64):
    model, params = functionalize(_net())
    tasks = _class_tasks()
    exact, _, _ = _meta_gradient(imaml(model, inner_lr=0.2, steps=20, lam=0.5, cg_iterations=60), params, tasks, "vmap")
    errors = [tree_relative_error(_meta_gradient(imaml(model, inner_lr=0.2, steps=20, lam=0.5, cg_iterations=c),
                                                 params, tasks, "vmap")[0], exact) for c in (1, 4, 16)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4, errors


@pytest.mark.parametrize("kwargs, error, message", [
    ({"lam": 0.0}, ValueError, r"imaml: lam must be > 0 \(got 0.0\)"),
    ({"lam": -1.0}, ValueError, r"imaml: lam must be > 0 \(got -1.0\)"),
    ({"cg_iterations": 0}, ValueError, r"imaml: cg_iterations must be >= 1 \(got 0\)"),
    ({"damping": -0.1}, ValueError, r"imaml: damping must be >= 0 \(got -0.1\)"),
    ({"solver": "lbfgs"}, ValueError, r"imaml: solver must be one of 'sgd', 'adam' \(got 'lbfgs'\)"),
    ({"steps": 0}, ValueError, r"imaml: steps must be >= 1 \(got 0\)"),
])
def test_bad_arguments(kwargs, error, message):
    model, _ = functionalize(_net())
    with pytest.raises(error, match=message):
        imaml(model, **{"inner_lr": 0.1, **kwargs})
