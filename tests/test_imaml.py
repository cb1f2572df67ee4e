"""iMAML and the conjugate-gradient solver: closed forms on a quadratic, an explicit-Hessian reference on a model
with BatchNorm, and convergence to the unrolled gradient, all in float64."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metafunc import Task, functionalize, learner_for_path, meta_batch, models, sinusoid_tasks
from metafunc.core.tree import tree_relative_error
from metafunc.gradients import (
    CGDivergenceWarning,
    conjugate_gradient,
    conjugate_gradient_solution,
    imaml,
    proximal_inner_loop,
)

PAPER = {"damping": 0.0, "lam_damping": 0.0, "inner_loop": "proximal"}
"""The paper's system (I + H/lam) g = grad L_q after a proximal inner loop; imaml's defaults are the authors' code's."""


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
    learner = imaml(model, inner_lr=0.1, steps=400, loss="mse", lam=lam, cg_iterations=4, **PAPER)
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
    learner = imaml(model, inner_lr=0.2, steps=20, lam=2.0, cg_iterations=n, **PAPER)
    got, loss, metrics = _meta_gradient(learner, params, tasks, mode)
    reference = reference_implicit_gradient(net, params, tasks, lr=0.2, lam=2.0, steps=20)
    assert tree_relative_error(got, reference) < 1e-10
    assert set(metrics) == {"loss", "accuracy", "support_loss", "cg_residual"}


def test_implicit_gradient_approaches_unrolled_as_inner_problem_converges(float64):
    net = _net()
    model, params = functionalize(net)
    tasks = _class_tasks()
    n = sum(v.numel() for v in params.values())
    errors = []
    for steps in (5, 20, 80):
        learner = learner_for_path("implicit").build(model, inner_lr=0.2, steps=steps, lam=2.0, cg_iterations=n,
                                                            **PAPER)
        got, _, _ = _meta_gradient(learner, params, tasks, "vmap")
        unrolled = reference_unrolled_gradient(net, params, tasks, lr=0.2, lam=2.0, steps=steps)
        errors.append(tree_relative_error(got, unrolled))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] > 1e-3   # a short inner loop is far from its fixed point ...
    assert errors[2] < 1e-8   # ... a converged one gives the implicit gradient


def test_fewer_cg_iterations_approximate(float64):
    model, params = functionalize(_net())
    tasks = _class_tasks()
    exact, _, _ = _meta_gradient(imaml(model, inner_lr=0.2, steps=20, lam=0.5, cg_iterations=60, **PAPER), params,
                                 tasks, "vmap")
    errors = [tree_relative_error(_meta_gradient(imaml(model, inner_lr=0.2, steps=20, lam=0.5, cg_iterations=c,
                                                                       **PAPER),
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


# ---------------------------------------------------------------- the paper's system and the authors' code's


def reference_system_gradient(module, params, tasks, *, lr, lam, steps, damping, lam_damping, inner_loop):
    """Plain autograd: the inner loop (proximal SGD, or plain SGD then one step on the proximal term alone), the
    explicit Hessian of L_s at phi by double backward, then a dense solve of
    ((1 + damping) I + H/(lam + lam_damping)) g = grad L_q, mean over tasks."""
    support, query = _plain_losses(module)
    grads = []
    for i in range(tasks.num_tasks):
        t = tasks.task_at(i)
        theta = _flat(params).detach()
        phi = theta.clone().requires_grad_(True)
        for _ in range(steps):
            objective = support(phi, params, t)
            if inner_loop == "proximal":
                objective = objective + lam / 2 * ((phi - theta) ** 2).sum()
            (g,) = torch.autograd.grad(objective, phi)
            phi = (phi - lr * g).detach().requires_grad_(True)
        if inner_loop == "pull_back":
            phi = (phi - lr * lam * (phi - theta)).detach().requires_grad_(True)
        (gq,) = torch.autograd.grad(query(phi, params, t), phi)
        (gs,) = torch.autograd.grad(support(phi, params, t), phi, create_graph=True)
        hessian = torch.stack([torch.autograd.grad(gs[j], phi, retain_graph=True)[0] for j in range(len(phi))])
        matrix = (1 + damping) * torch.eye(len(phi)) + hessian / (lam + lam_damping)
        grads.append(torch.linalg.solve(matrix, gq))
    return _unflat(torch.stack(grads).mean(0), params)


FORMULATIONS = {
    "paper": PAPER,
    "official": {"damping": 1.0, "lam_damping": 10.0, "inner_loop": "pull_back"},
    "damped-proximal": {"damping": 0.5, "lam_damping": 3.0, "inner_loop": "proximal"},
    "undamped-pull-back": {"damping": 0.0, "lam_damping": 0.0, "inner_loop": "pull_back"},
}


def test_defaults_are_the_official_system():
    defaults = {k: v.default for k, v in inspect.signature(imaml).parameters.items() if k in FORMULATIONS["official"]}
    assert defaults == FORMULATIONS["official"]


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("formulation", list(FORMULATIONS))
def test_each_system_equals_its_explicit_solve(float64, formulation, mode):
    net = _net()
    model, params = functionalize(net)
    tasks = _class_tasks()
    n = sum(v.numel() for v in params.values())
    options = FORMULATIONS[formulation]
    learner = imaml(model, inner_lr=0.2, steps=20, lam=2.0, cg_iterations=n, **options)
    got, _, metrics = _meta_gradient(learner, params, tasks, mode)
    reference = reference_system_gradient(net, params, tasks, lr=0.2, lam=2.0, steps=20, **options)
    assert tree_relative_error(got, reference) < 1e-10
    assert float(metrics["cg_residual"]) < 1e-8   # n iterations solve an n-dimensional system
    if formulation != "paper":   # a different system (or inner loop) from the paper's: a different gradient
        paper = reference_system_gradient(net, params, tasks, lr=0.2, lam=2.0, steps=20, **PAPER)
        assert tree_relative_error(got, paper) > 1e-2


def test_pull_back_inner_loop_by_hand(float64):
    model, params = functionalize(nn.Linear(3, 1))
    t = _regression_tasks(1).task_at(0)
    task_loss = lambda p, x, y: F.mse_loss(model(p, x), y)  # noqa: E731
    phi, losses = proximal_inner_loop(task_loss, steps=3, lr=0.1, lam=2.0, inner_loop="pull_back")(
        params, t.support_x, t.support_y)
    expected = {k: v.detach().clone() for k, v in params.items()}
    for _ in range(3):
        g = torch.func.grad(task_loss)(expected, t.support_x, t.support_y)
        expected = {k: expected[k] - 0.1 * g[k] for k in expected}
    expected = {k: expected[k] - 0.1 * 2.0 * (expected[k] - params[k].detach()) for k in expected}
    assert losses.shape == (3,)
    assert tree_relative_error(phi, expected) < 1e-14


# ---------------------------------------------------------------- the CG residual: reported, shrinking, checked


def test_cg_solution_reports_the_true_residual(float64):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g)
    a = m @ m.T + 0.5 * torch.eye(6)
    b = torch.randn(6, generator=g)
    true = [float((b - a @ conjugate_gradient(lambda v: a @ v, b, iterations=k)).norm() / b.norm()) for k in range(1, 7)]
    sol = conjugate_gradient_solution(lambda v: a @ v, b, iterations=6)
    assert torch.allclose(sol.residuals, torch.tensor([1.0, *true]), rtol=1e-6, atol=1e-12)
    assert sol.residual < 1e-10 and bool((sol.curvature > 0).all())
    # an indefinite matrix shows a non-positive curvature along some search direction
    indefinite = conjugate_gradient_solution(lambda v: (a - 3 * torch.eye(6)) @ v, b, iterations=6)
    assert float(indefinite.curvature.min()) <= 0 or float(torch.linalg.eigvalsh(a).min()) > 3


@pytest.mark.parametrize("formulation", ["paper", "official"])
def test_cg_residual_shrinks_with_iterations_on_a_convex_problem(float64, formulation):
    """Linear regression with MSE: H = 2/n Xa^T Xa is positive semi-definite, so CG converges monotonically here;
    the reported cg_residual is ||A g - grad L_q|| / ||grad L_q|| computed from the dense matrix."""
    model, params = functionalize(nn.Linear(3, 1))
    t = _regression_tasks(1).task_at(0)
    options = FORMULATIONS[formulation]
    xs = torch.cat([t.support_x, torch.ones(len(t.support_x), 1)], 1)
    hessian = 2 / len(xs) * xs.T @ xs
    matrix = (1 + options["damping"]) * torch.eye(4) + hessian / (1.0 + options["lam_damping"])
    residuals = []
    for iterations in (1, 2, 3, 4):
        learner = imaml(model, inner_lr=0.1, steps=50, loss="mse", lam=1.0, cg_iterations=iterations, **options)
        loss, metrics = learner.meta_loss(params, t)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        gvec = torch.cat([grads["weight"].reshape(-1), grads["bias"]])
        phi, _ = proximal_inner_loop(lambda p, x, y: F.mse_loss(model(p, x), y), steps=50, lr=0.1, lam=1.0,
                                     inner_loop=options["inner_loop"])(params, t.support_x, t.support_y)
        xq = torch.cat([t.query_x, torch.ones(len(t.query_x), 1)], 1)
        b = 2 / len(xq) * xq.T @ (xq @ torch.cat([phi["weight"].reshape(-1), phi["bias"]]) - t.query_y[:, 0])
        true = float((matrix @ gvec - b).norm() / b.norm())
        assert abs(float(metrics["cg_residual"]) - true) < 1e-8 * max(1.0, true)
        residuals.append(true)
    assert residuals[0] > residuals[1] > residuals[2] > residuals[3], residuals
    assert residuals[0] > 1e-3 and residuals[3] < 1e-10, residuals


def _diverging_case():
    """A sine-regression MLP with the paper's system at a tiny lam: I + H/lam is indefinite and 5 CG iterations end
    with a residual above the start on one of these tasks (2.28 against 1; float64, fixed seed)."""
    torch.manual_seed(0)
    model, params = functionalize(models.mlp())
    tasks = sinusoid_tasks(3, shots=10, generator=torch.Generator().manual_seed(0)).to(torch.float64)
    return model, params, tasks


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_cg_divergence_warns_once_with_the_fix(float64, mode):
    model, params, tasks = _diverging_case()
    learner = imaml(model, inner_lr=0.01, steps=20, loss="mse", lam=0.01, cg_iterations=5, **PAPER)
    with pytest.warns(CGDivergenceWarning, match=r"imaml: conjugate gradient diverged on \d+ of \d+ task\(s\): the "
                      r"residual .* damping=0, lam=0.01, lam_damping=0, grew from 1 to 2.28 .* met negative curvature .* Raise "
                      r"damping \(the authors' code uses damping=1\) or lam_damping \(their 10\), or lam"):
        _, _, metrics = _meta_gradient(learner, params, tasks, mode)
    assert float(metrics["cg_residual"]) > 1 / tasks.num_tasks   # some task ended above its start
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _meta_gradient(learner, params, tasks, mode)            # warned once per learner
        quiet = imaml(model, inner_lr=0.01, steps=20, loss="mse", lam=0.01, cg_iterations=5, on_cg_divergence="ignore",
                      **PAPER)
        _, _, ignored = _meta_gradient(quiet, params, tasks, mode)
        # the authors' damping keeps the same tasks' solve from diverging
        _, _, damped = _meta_gradient(imaml(model, inner_lr=0.01, steps=20, loss="mse", lam=0.01, cg_iterations=5),
                                      params, tasks, mode)
    assert float(ignored["cg_residual"]) == pytest.approx(float(metrics["cg_residual"]), rel=1e-12)
    assert float(damped["cg_residual"]) < 1


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_cg_divergence_can_raise(float64, mode):
    model, params, tasks = _diverging_case()
    learner = imaml(model, inner_lr=0.01, steps=20, loss="mse", lam=0.01, cg_iterations=5, on_cg_divergence="raise",
                    **PAPER)
    with pytest.raises(RuntimeError, match=r"imaml: conjugate gradient diverged .* Raise damping .* \(or pass "
                                           r"on_cg_divergence='warn' to train on\)"):
        _meta_gradient(learner, params, tasks, mode)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"lam_damping": -1.0}, ValueError, r"imaml: lam_damping must be >= 0 \(got -1.0\)"),
    ({"inner_loop": "newton"}, ValueError, r"imaml: inner_loop must be one of 'pull_back', 'proximal' \(got 'newton'\)"),
    ({"on_cg_divergence": "stop"}, ValueError,
     r"imaml: on_cg_divergence must be one of 'warn', 'raise', 'ignore' \(got 'stop'\)"),
    ({"inner_lr": 0.4, "lam": 4.0}, ValueError, r"imaml: inner_loop='pull_back' needs inner_lr \* lam <= 1 \(got "
                                                r"inner_lr \* lam = 0.4 \* 4.0 = 1.6: .* lower lam to at most 2.5, or use "
                                                r"inner_loop='proximal'"),
])
def test_bad_system_arguments(kwargs, error, message):
    model, _ = functionalize(_net())
    with pytest.raises(error, match=message):
        imaml(model, **{"inner_lr": 0.1, **kwargs})
