"""Every meta-gradient path of metafunc equals a plain ``torch.autograd`` loop in float64 (rel. error < 1e-10).

The reference runs on a module built from torch's own layers (``tests/reference.py``: ``nn.BatchNorm2d``,
``nn.LayerNorm``), metafunc on ``convert_norm_layers`` of a copy of it (same weights and names, metafunc's exact
norm layers), and the two are compared with the reference's own ``relative_error``."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from learner_cases import classification_tasks, feature_tasks, regression_tasks
from reference import (
    finite_difference_gradient,
    reference_meta_gradient,
    reference_meta_loss_value,
    relative_error,
    torch_conv4,
    torch_mlp,
)
from torch import nn

from metafunc import (
    META_SGD_LR_PREFIX,
    Task,
    anil,
    boil,
    checkpointed_maml,
    convert_norm_layers,
    fomaml,
    functionalize,
    maml,
    meta_batch,
    meta_sgd,
    reptile,
)

FACTORIES = {"maml": maml, "fomaml": fomaml, "anil": anil, "boil": boil, "meta_sgd": meta_sgd, "reptile": reptile}

# name -> (torch module builder, tasks builder, loss, inner learning rate)
SETTINGS = {
    "conv4-batchnorm": (lambda: torch_conv4(2, width=4, image_size=28, norm="batch"),
                        classification_tasks(ways=2, shots=1, queries=1, image_size=28), "cross_entropy", 0.3),
    "mlp-layernorm": (lambda: torch_mlp(4, (8, 8), 3, layer_norm=True), feature_tasks(features=4, ways=3),
                      "cross_entropy", 0.3),
    "mlp": (lambda: torch_mlp(1, (8, 8), 1), regression_tasks(shots=5, queries=5), "mse", 0.05),
}


def _setup(model_name: str, *, seed: int = 0, num_tasks: int = 2):
    make_module, make_tasks, loss, lr = SETTINGS[model_name]
    torch.manual_seed(seed)
    module = make_module().to(torch.float64)
    tasks = make_tasks(num_tasks, torch.Generator().manual_seed(seed)).to(dtype=torch.float64)
    return module, tasks, loss, lr


def _learner(algorithm: str, module: nn.Module, *, loss, lr: float, steps: int):
    """metafunc's learner on ``convert_norm_layers(module)`` (a copy; torch's module stays the reference's)."""
    model, params = functionalize(convert_norm_layers(module))
    learner = FACTORIES[algorithm](model, inner_lr=lr, steps=steps, loss=loss)
    meta_params = learner.init(params)
    if algorithm == "meta_sgd":
        # Distinct learning rates per entry, so a wrong pairing of rates and weights would show.
        g = torch.Generator().manual_seed(1)
        meta_params = {k: (v * (0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype)) if k.startswith(META_SGD_LR_PREFIX)
                           else v).detach().requires_grad_(True) for k, v in meta_params.items()}
    return learner, meta_params


def _metafunc_gradient(learner, params, tasks, *, mode: str, chunk_size=None):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss, _ = meta_batch(learner.meta_loss, mode=mode, chunk_size=chunk_size)(leaves, tasks)
    loss.backward()
    return {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}


@functools.lru_cache(maxsize=None)
def _case(algorithm: str, model_name: str, steps: int):
    module, tasks, loss, lr = _setup(model_name)
    learner, params = _learner(algorithm, module, loss=loss, lr=lr, steps=steps)
    reference = reference_meta_gradient(module, params, tasks, algorithm=algorithm, inner_lr=lr, steps=steps, loss=loss)
    return learner, params, tasks, reference


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 3], ids=["steps=1", "steps=3"])
@pytest.mark.parametrize("model_name", list(SETTINGS))
@pytest.mark.parametrize("algorithm", list(FACTORIES))
def test_meta_gradient_equals_autograd_reference(algorithm, model_name, steps, mode):
    learner, params, tasks, reference = _case(algorithm, model_name, steps)
    grads = _metafunc_gradient(learner, params, tasks, mode=mode)
    assert sum(float(g.norm()) for g in reference.values()) > 0
    assert relative_error(grads, reference) < 1e-10


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("hvp", ["reverse", "forward"])
@pytest.mark.parametrize("model_name", ["conv4-batchnorm", "mlp-layernorm"])
def test_checkpointed_maml_equals_the_maml_reference_on_torch_modules(model_name, hvp, mode):
    # Both ways of taking the Hessian-vector products, against second-order MAML written on nn.BatchNorm2d and
    # nn.LayerNorm (3 steps from 2 checkpoints, so one segment is recomputed).
    module, tasks, loss, lr = _setup(model_name)
    model, params = functionalize(convert_norm_layers(module))
    learner = checkpointed_maml(model, inner_lr=lr, steps=3, checkpoints=2, loss=loss, hvp=hvp)
    reference = reference_meta_gradient(module, params, tasks, algorithm="maml", inner_lr=lr, steps=3, loss=loss)
    assert sum(float(g.norm()) for g in reference.values()) > 0
    assert relative_error(_metafunc_gradient(learner, params, tasks, mode=mode), reference) < 1e-10


@pytest.mark.parametrize("algorithm", list(FACTORIES))
def test_chunked_vmap_equals_reference(algorithm):
    module, tasks, loss, lr = _setup("mlp-layernorm", num_tasks=3)
    learner, params = _learner(algorithm, module, loss=loss, lr=lr, steps=2)
    reference = reference_meta_gradient(module, params, tasks, algorithm=algorithm, inner_lr=lr, steps=2, loss=loss)
    grads = _metafunc_gradient(learner, params, tasks, mode="vmap", chunk_size=2)
    assert relative_error(grads, reference) < 1e-10


@pytest.mark.parametrize("algorithm", ["maml", "meta_sgd", "anil"])
def test_second_order_meta_gradient_matches_finite_differences(algorithm):
    torch.manual_seed(3)
    module = torch_mlp(1, (3,), 1, layer_norm=True).to(torch.float64)
    tasks = regression_tasks(shots=4, queries=4)(2, torch.Generator().manual_seed(3)).to(dtype=torch.float64)
    learner, params = _learner(algorithm, module, loss="mse", lr=0.1, steps=2)
    grads = _metafunc_gradient(learner, params, tasks, mode="vmap")
    numeric = finite_difference_gradient(
        lambda p: reference_meta_loss_value(module, p, tasks, algorithm=algorithm, inner_lr=0.1, steps=2, loss="mse"),
        params,
    )
    assert relative_error(grads, numeric) < 1e-6
    # And the finite differences can tell second order from first order on this model.
    first = _metafunc_gradient(fomaml(learner.model, inner_lr=0.1, steps=2, loss="mse"),
                               {k: v for k, v in params.items() if not k.startswith(META_SGD_LR_PREFIX)},
                               tasks, mode="vmap")
    if algorithm == "maml":
        assert relative_error(first, numeric) > 1e-3


# --- first order against second order -------------------------------------------------------------------------


def _linear_tasks(num_tasks: int = 2, n: int = 6, d: int = 3) -> Task:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(num_tasks, 2 * n, d, generator=g, dtype=torch.float64)
    y = torch.randn(num_tasks, 2 * n, 1, generator=g, dtype=torch.float64)
    return Task(x[:, :n], y[:, :n], x[:, n:], y[:, n:])


def _flat_grad(grads: dict, module: nn.Linear) -> torch.Tensor:
    return torch.cat([grads["weight"].reshape(-1), grads["bias"].reshape(-1)])


@pytest.mark.parametrize("steps", [1, 3], ids=["steps=1", "steps=3"])
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_maml_on_linear_regression_has_the_closed_form_hessian_term(steps, mode):
    """For MSE on a linear model the support Hessian H is constant, so MAML = (I - a H)^k FOMAML per task."""
    torch.manual_seed(0)
    module = nn.Linear(3, 1).to(torch.float64)
    model, params = functionalize(module)
    tasks, a = _linear_tasks(), 0.1
    expected = []
    for i in range(tasks.num_tasks):
        task = tasks.task_at(i)
        single = Task(*(t.unsqueeze(0) for t in task))
        fo = _flat_grad(_metafunc_gradient(fomaml(model, inner_lr=a, steps=steps, loss="mse"), params, single, mode=mode),
                        module)
        xt = torch.cat([task.support_x, torch.ones(task.support_x.shape[0], 1, dtype=torch.float64)], 1)
        hessian = 2.0 / xt.shape[0] * xt.T @ xt
        jacobian = torch.linalg.matrix_power(torch.eye(4, dtype=torch.float64) - a * hessian, steps)
        expected.append(jacobian @ fo)
    expected_mean = torch.stack(expected).mean(0)
    second = _flat_grad(_metafunc_gradient(maml(model, inner_lr=a, steps=steps, loss="mse"), params, tasks, mode=mode),
                        module)
    first = _flat_grad(_metafunc_gradient(fomaml(model, inner_lr=a, steps=steps, loss="mse"), params, tasks, mode=mode),
                       module)
    assert torch.linalg.norm(second - expected_mean) / torch.linalg.norm(expected_mean) < 1e-10
    assert torch.linalg.norm(second - first) / torch.linalg.norm(second) > 1e-2


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_first_and_second_order_agree_when_the_support_loss_is_linear(mode):
    """With a loss linear in the parameters the Hessian term vanishes: MAML and FOMAML give the same gradient."""
    torch.manual_seed(0)
    model, params = functionalize(nn.Linear(3, 1).to(torch.float64))
    tasks = _linear_tasks()

    def linear_loss(prediction, target):
        return (prediction * target).mean()

    second = _metafunc_gradient(maml(model, inner_lr=0.5, steps=3, loss=linear_loss), params, tasks, mode=mode)
    first = _metafunc_gradient(fomaml(model, inner_lr=0.5, steps=3, loss=linear_loss), params, tasks, mode=mode)
    assert relative_error(second, first) < 1e-12


@pytest.mark.parametrize("model_name", ["conv4-batchnorm", "mlp-layernorm"])
def test_first_and_second_order_differ_on_a_nonlinear_model(model_name):
    module, tasks, loss, lr = _setup(model_name)
    model, params = functionalize(convert_norm_layers(module))
    second = _metafunc_gradient(maml(model, inner_lr=lr, steps=1, loss=loss), params, tasks, mode="vmap")
    first = _metafunc_gradient(fomaml(model, inner_lr=lr, steps=1, loss=loss), params, tasks, mode="vmap")
    first_flag = _metafunc_gradient(maml(model, inner_lr=lr, steps=1, loss=loss, first_order=True), params, tasks,
                                    mode="loop")
    assert relative_error(first, second) > 1e-3
    assert relative_error(first_flag, first) < 1e-12


# --- Meta-SGD learns its learning rates ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_meta_sgd_learning_rates_get_gradients_and_change_after_an_outer_step(mode):
    module, tasks, loss, lr = _setup("mlp-layernorm")
    model, params = functionalize(convert_norm_layers(module))
    learner = meta_sgd(model, inner_lr=lr, steps=2, loss=loss)
    meta_params = learner.init(params)
    rates = {k: v for k, v in meta_params.items() if k.startswith(META_SGD_LR_PREFIX)}
    assert sorted(rates) == sorted(META_SGD_LR_PREFIX + k for k in params)
    before = {k: v.detach().clone() for k, v in rates.items()}
    optimizer = torch.optim.SGD(meta_params.values(), lr=0.1)
    loss_value, _ = meta_batch(learner.meta_loss, mode=mode)(meta_params, tasks)
    loss_value.backward()
    for name, rate in rates.items():
        assert rate.grad is not None and rate.grad.abs().sum() > 0, name
    optimizer.step()
    for name, rate in rates.items():
        assert not torch.equal(rate.detach(), before[name]), name
        assert torch.allclose(rate.detach(), before[name] - 0.1 * rate.grad), name


def test_first_order_meta_sgd_still_learns_its_learning_rates():
    """First order drops the Hessian term, not d phi / d alpha = -grad: the rates must still learn."""
    module, tasks, loss, lr = _setup("mlp-layernorm")
    model, params = functionalize(convert_norm_layers(module))
    learner = meta_sgd(model, inner_lr=lr, steps=2, loss=loss, first_order=True)
    meta_params = learner.init(params)
    grads = _metafunc_gradient(learner, meta_params, tasks, mode="vmap")
    # Reference: phi = theta - alpha * stopgrad(g) step by step; differentiate the query loss.
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in meta_params.items()}
    total = 0.0
    for i in range(tasks.num_tasks):
        sx, sy, qx, qy = tasks.task_at(i)
        fast = {k: v for k, v in leaves.items() if not k.startswith(META_SGD_LR_PREFIX)}
        for _ in range(2):
            g = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(module, fast, (sx,)), sy),
                                    list(fast.values()))
            fast = {k: v - leaves[META_SGD_LR_PREFIX + k] * gi.detach() for (k, v), gi in zip(fast.items(), g)}
        total = total + F.cross_entropy(torch.func.functional_call(module, fast, (qx,)), qy)
    reference = dict(zip(leaves, torch.autograd.grad(total / tasks.num_tasks, list(leaves.values()))))
    assert relative_error(grads, reference) < 1e-10
    assert all(grads[k].abs().sum() > 0 for k in grads if k.startswith(META_SGD_LR_PREFIX))


# --- composition with torch.func.grad -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("algorithm", list(FACTORIES))
def test_torch_func_grad_of_meta_batch_equals_backward(algorithm, mode):
    learner, params, tasks, reference = _case(algorithm, "mlp-layernorm", 1)
    detached = {k: v.detach() for k, v in params.items()}
    tree = torch.func.grad(lambda p: meta_batch(learner.meta_loss, mode=mode)(p, tasks)[0])(detached)
    backward = _metafunc_gradient(learner, params, tasks, mode=mode)
    assert list(tree) == list(params)
    assert relative_error(tree, backward) < 1e-12
    assert relative_error(tree, reference) < 1e-10


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_torch_func_grad_of_first_order_meta_sgd_equals_backward(mode):
    module, tasks, loss, lr = _setup("mlp-layernorm")
    model, params = functionalize(convert_norm_layers(module))
    learner = meta_sgd(model, inner_lr=lr, steps=2, loss=loss, first_order=True)
    meta_params = {k: v.detach() for k, v in learner.init(params).items()}
    tree = torch.func.grad(lambda p: meta_batch(learner.meta_loss, mode=mode)(p, tasks)[0])(meta_params)
    backward = _metafunc_gradient(learner, meta_params, tasks, mode=mode)
    assert relative_error(tree, backward) < 1e-12
    assert all(tree[k].abs().sum() > 0 for k in tree if k.startswith(META_SGD_LR_PREFIX))


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_reptile_with_sgd_is_the_interpolation_step(mode):
    """torch.optim.SGD(lr=epsilon) on Reptile's meta-loss gives theta + epsilon * mean_i(phi_i - theta)."""
    module, tasks, loss, lr = _setup("mlp-layernorm")
    model, params = functionalize(convert_norm_layers(module))
    learner = reptile(model, inner_lr=lr, steps=3, loss=loss)
    theta = {k: v.detach().clone() for k, v in params.items()}
    adapted = [learner.adapt(theta, *tasks.task_at(i)[:2])[0] for i in range(tasks.num_tasks)]
    optimizer = torch.optim.SGD(params.values(), lr=0.25)
    meta_batch(learner.meta_loss, mode=mode)(params, tasks)[0].backward()
    optimizer.step()
    expected = {k: theta[k] + 0.25 * torch.stack([phi[k] - theta[k] for phi in adapted]).mean(0) for k in theta}
    assert relative_error({k: v.detach() for k, v in params.items()}, expected) < 1e-12
