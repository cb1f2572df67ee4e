"""The fast paths give the exact meta-gradient: ``mode="auto"``, the plain-autograd inner loop that the loop mode
takes, the fused BatchNorm used outside ``torch.func`` transforms, and ``meta_value_and_grad`` (per-task backward),
each against a float64 reference written from elementary ops with ``torch.autograd.grad(create_graph=True)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metafunc import Task, functionalize, maml, meta_batch, meta_sgd, meta_value_and_grad, models, resolve_mode
from metafunc.core.inner import inner_loop
from metafunc.core.tree import tree_relative_error
from metafunc.nn.norm import BatchNorm

f64 = torch.float64
LR, WAYS = 0.3, 3


def _conv4():
    torch.manual_seed(0)
    return models.conv4(ways=WAYS, width=4, image_size=16, norm="batch").to(f64)


def _tasks(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Task(torch.randn(n, WAYS, 1, 16, 16, generator=g, dtype=f64), torch.arange(WAYS).repeat(n, 1),
                torch.randn(n, 2 * WAYS, 1, 16, 16, generator=g, dtype=f64), torch.arange(WAYS).repeat(n, 2))


def _forward(p, x):
    """Conv-4 written out from elementary ops (BatchNorm as mean, variance and rsqrt): independent of metafunc."""
    for i in range(4):
        x = F.conv2d(x, p[f"features.{i}.0.weight"], p[f"features.{i}.0.bias"], padding=1)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        x = (x - mean) / torch.sqrt(var + 1e-5)
        x = x * p[f"features.{i}.1.weight"].reshape(1, -1, 1, 1) + p[f"features.{i}.1.bias"].reshape(1, -1, 1, 1)
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), p["head.weight"], p["head.bias"])


def _reference(params, tasks, *, steps, first_order):
    names = list(params)
    leaves = [params[k].detach().clone().requires_grad_() for k in names]
    total = 0.0
    for i in range(tasks.num_tasks):
        sx, sy, qx, qy = (t[i] for t in tasks)
        fast = leaves
        for _ in range(steps):
            loss = F.cross_entropy(_forward(dict(zip(names, fast)), sx), sy)
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [p - LR * g for p, g in zip(fast, grads)]
        total = total + F.cross_entropy(_forward(dict(zip(names, fast)), qx), qy)
    grads = torch.autograd.grad(total / tasks.num_tasks, leaves)
    return dict(zip(names, grads))


def _via_backward(mode, chunk=None):
    def run(learner, params, tasks):
        loss, _ = meta_batch(learner.meta_loss, mode=mode, chunk_size=chunk)(params, tasks)
        return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    return run


def _via_value_and_grad(mode, chunk=None):
    def run(learner, params, tasks):
        return meta_value_and_grad(learner.meta_loss, mode=mode, chunk_size=chunk)(params, tasks)[2]
    return run


PATHS = {
    "meta_batch-auto": _via_backward("auto"),
    "meta_batch-loop": _via_backward("loop"),
    "meta_batch-vmap": _via_backward("vmap"),
    "value_and_grad-auto": _via_value_and_grad("auto"),
    "value_and_grad-loop": _via_value_and_grad("loop"),
    "value_and_grad-vmap-chunk2": _via_value_and_grad("vmap", 2),
}


@pytest.mark.parametrize("order,steps", [("second", 2), ("first", 1)])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_fast_path_gives_the_reference_meta_gradient(path, order, steps):
    model, params = functionalize(_conv4())
    tasks = _tasks()
    learner = maml(model, inner_lr=LR, steps=steps, first_order=order == "first")
    got = PATHS[path](learner, params, tasks)
    reference = _reference(params, tasks, steps=steps, first_order=order == "first")
    assert tree_relative_error(got, reference) < 1e-10


def test_loop_inside_an_outer_transform_takes_the_torch_func_path_and_is_exact():
    model, params = functionalize(_conv4())
    tasks = _tasks(2)
    learner = maml(model, inner_lr=LR, steps=2)
    got = torch.func.grad(lambda p: meta_batch(learner.meta_loss, mode="loop")(p, tasks)[0])(params)
    assert tree_relative_error(got, _reference(params, tasks, steps=2, first_order=False)) < 1e-10


def test_meta_sgd_learning_rates_get_the_same_gradient_from_the_loop_and_vmap():
    model, params = functionalize(_conv4())
    learner = meta_sgd(model, inner_lr=LR, steps=2)
    meta_params = learner.init(params)
    tasks = _tasks(2)
    loop = meta_value_and_grad(learner.meta_loss, mode="loop")(meta_params, tasks)[2]
    vmapped = meta_value_and_grad(learner.meta_loss, mode="vmap")(meta_params, tasks)[2]
    assert set(loop) == set(meta_params)
    assert float(loop["inner_lr/head.weight"].abs().sum()) > 0
    assert tree_relative_error(loop, vmapped) < 1e-10


def test_value_and_grad_reports_the_mean_loss_and_metrics_of_meta_batch():
    model, params = functionalize(_conv4())
    learner = maml(model, inner_lr=LR, steps=1)
    tasks = _tasks(3)
    loss, metrics, _ = meta_value_and_grad(learner.meta_loss)(params, tasks)
    expected, expected_metrics = meta_batch(learner.meta_loss, mode="vmap")(params, tasks)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=0)
    assert set(metrics) == set(expected_metrics)
    torch.testing.assert_close(metrics["accuracy"], expected_metrics["accuracy"])


def test_inner_loop_fast_path_without_grad_mode_matches_the_torch_func_path():
    model, params = functionalize(_conv4())
    tasks = _tasks(1)
    adapt = inner_loop(lambda p, x, y: F.cross_entropy(model(p, x), y), steps=2, lr=LR)
    with torch.no_grad():
        fast, losses = adapt(params, tasks.support_x[0], tasks.support_y[0])
    reference, ref_losses = torch.func.vmap(lambda sx, sy: adapt(params, sx, sy))(tasks.support_x, tasks.support_y)
    assert all(not v.requires_grad for v in fast.values())
    assert tree_relative_error(fast, {k: v[0] for k, v in reference.items()}) < 1e-12
    torch.testing.assert_close(losses, ref_losses[0])


def test_batchnorm_fused_path_equals_the_elementary_path_and_keeps_single_values():
    bn = BatchNorm(4).to(f64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(6, 4, 3, 3, dtype=f64)
    fused = bn(x)  # no transform: torch's fused kernel
    elementary = torch.func.vmap(bn)(x[None])[0]
    torch.testing.assert_close(fused, elementary, rtol=1e-12, atol=1e-12)
    one = torch.randn(1, 4, 1, 1, dtype=f64)  # one value per channel: the fused kernel refuses, the path does not
    torch.testing.assert_close(bn(one), bn.bias.reshape(1, 4, 1, 1).expand(1, 4, 1, 1))


def test_resolve_mode_on_cpu_is_the_loop_and_forced_modes_are_kept():
    tasks = _tasks(4)
    assert resolve_mode({}, tasks) == ("loop", None)
    assert resolve_mode({}, tasks, mode="vmap", chunk_size=2) == ("vmap", 2)
    assert resolve_mode({}, tasks, mode="loop") == ("loop", None)


def test_auto_mode_runs_torch_norm_layers_at_second_order_in_the_loop_and_vmap_refuses_them():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False),
                                 torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, WAYS)).to(f64)
    model, params = functionalize(module)
    learner = maml(model, inner_lr=LR)
    with pytest.raises(ValueError, match=r"^maml: the model has torch norm layers \['1 \(BatchNorm2d\)'\].*mode='loop'"):
        meta_value_and_grad(learner.meta_loss, mode="vmap")(params, _tasks(2))
    _, _, want = meta_value_and_grad(learner.meta_loss, mode="loop")(params, _tasks(2))
    step = meta_value_and_grad(learner.meta_loss)   # auto: vmap is not a candidate for this model
    for _ in range(4):
        _, _, grads = step(params, _tasks(2))
        assert step.plan.mode == "loop" and tree_relative_error(grads, want) < 1e-12


def test_bad_arguments_name_the_function_the_value_and_the_fix():
    model, params = functionalize(_conv4())
    learner = maml(model, inner_lr=LR)
    with pytest.raises(ValueError, match=r"^meta_value_and_grad: mode must be one of 'vmap', 'loop' \(got 'pmap'\); "
                                         r"or 'auto'"):
        meta_value_and_grad(learner.meta_loss, mode="pmap")
    with pytest.raises(ValueError, match=r"^meta_batch: mode must be one of 'vmap', 'loop' \(got 'pmap'\); or 'auto'"):
        meta_batch(learner.meta_loss, mode="pmap")
    frozen = {k: v.detach() for k, v in params.items()}
    with pytest.raises(ValueError, match=r"^meta_value_and_grad: no parameter requires grad"):
        meta_value_and_grad(learner.meta_loss)(frozen, _tasks(2))
    with pytest.raises(TypeError, match=r"^meta_value_and_grad: per_task must be a MetaLearner or callable as per_task\(params, task\) \(got int\)"):
        meta_value_and_grad(3)
