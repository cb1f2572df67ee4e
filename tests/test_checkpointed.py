"""Checkpointed exact MAML against a plain torch.autograd reference and metafunc.maml, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import reference_meta_gradient, reference_meta_loss_value, relative_error, torch_mlp
from torch import nn
from torch.func import functional_call

from metafunc import (
    Task,
    convert_norm_layers,
    functionalize,
    learner_for_path,
    maml,
    meta_batch,
    models,
    path_names,
    sinusoid_tasks,
)
from metafunc.core.tree import tree_norm, tree_relative_error, tree_scale
from metafunc.gradients import checkpoint_positions, checkpointed_maml, default_checkpoints

LR = 0.3


def _net() -> nn.Module:
    # A tiny MLP with metafunc's exact BatchNorm: 4 -> 6 (BN, ReLU) -> 3.
    return models.mlp(in_features=4, hidden=(6,), out_features=3, norm="batch")


def _tasks(n: int = 2, shots: int = 6) -> Task:
    g = torch.Generator().manual_seed(1)
    return Task(torch.randn(n, shots, 4, generator=g), torch.randint(0, 3, (n, shots), generator=g),
                torch.randn(n, shots, 4, generator=g), torch.randint(0, 3, (n, shots), generator=g))


def reference_maml_gradient(module: nn.Module, params: dict, tasks: Task, *, lr: float, steps: int,
                            adapt=lambda name: True) -> dict:
    """Plain autograd: a Python loop over tasks and steps with create_graph=True, mean over tasks."""
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    total = 0.0
    for i in range(tasks.num_tasks):
        t = tasks.task_at(i)
        fast = dict(theta)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(module, fast, (t.support_x,)), t.support_y)
            names = [k for k in fast if adapt(k)]
            grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=True)
            fast = {**fast, **{k: fast[k] - lr * g for k, g in zip(names, grads)}}
        total = total + F.cross_entropy(functional_call(module, fast, (t.query_x,)), t.query_y)
    grads = torch.autograd.grad(total / tasks.num_tasks, list(theta.values()))
    return dict(zip(theta, grads))


def _meta_gradient(learner, params, tasks, mode):
    loss, metrics = meta_batch(learner.meta_loss, mode=mode)(params, tasks)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())))), loss, metrics


@pytest.mark.parametrize("hvp", ["forward", "reverse"])
@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_checkpointed_equals_unrolled_exact(float64, steps, mode, hvp):
    net = _net()
    model, params = functionalize(net)
    tasks = _tasks()
    reference = reference_maml_gradient(net, params, tasks, lr=LR, steps=steps)
    exact, exact_loss, _ = _meta_gradient(maml(model, inner_lr=LR, steps=steps), params, tasks, "loop")
    got, loss, metrics = _meta_gradient(checkpointed_maml(model, inner_lr=LR, steps=steps, hvp=hvp), params, tasks,
                                        mode)
    assert tree_relative_error(got, reference) < 1e-10
    assert tree_relative_error(got, exact) < 1e-10
    assert torch.allclose(loss, exact_loss, rtol=1e-12, atol=0)
    assert set(metrics) == {"loss", "accuracy", "support_loss"}


@pytest.mark.parametrize("hvp", ["forward", "reverse"])
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_mse_regression_equals_the_maml_reference(float64, mode, hvp):
    # loss="mse" on a LayerNorm MLP (sinusoid regression): forward mode used to raise "ZeroTensors are immutable"
    # (torch's forward-AD formula of mse_loss's backward divides a zero target tangent in place, pytorch#123996).
    torch.manual_seed(0)
    module = torch_mlp(1, (8, 8), 1, layer_norm=True)
    model, params = functionalize(convert_norm_layers(module))
    tasks = sinusoid_tasks(2, shots=5, queries=5, generator=torch.Generator().manual_seed(0)).to(torch.float64)
    reference = reference_meta_gradient(module, params, tasks, algorithm="maml", inner_lr=0.05, steps=3, loss="mse")
    learner = checkpointed_maml(model, inner_lr=0.05, steps=3, checkpoints=2, loss="mse", hvp=hvp)
    got, loss, _ = _meta_gradient(learner, params, tasks, mode)
    assert sum(float(g.norm()) for g in reference.values()) > 0
    assert relative_error(got, reference) < 1e-10
    want = reference_meta_loss_value(module, params, tasks, algorithm="maml", inner_lr=0.05, steps=3, loss="mse")
    assert abs(loss.item() - want) < 1e-12 * abs(want)


@pytest.mark.parametrize("checkpoints", [1, 2, 3, 7])
def test_any_number_of_checkpoints_is_exact(float64, checkpoints):
    net = _net()
    model, params = functionalize(net)
    tasks = _tasks()
    reference = reference_maml_gradient(net, params, tasks, lr=LR, steps=7)
    learner = checkpointed_maml(model, inner_lr=LR, steps=7, checkpoints=checkpoints)
    got, _, _ = _meta_gradient(learner, params, tasks, "vmap")
    assert tree_relative_error(got, reference) < 1e-10


def test_loss_backward_gives_the_meta_gradient(float64):
    net = _net()
    model, params = functionalize(net)
    tasks = _tasks(3)
    reference = reference_maml_gradient(net, params, tasks, lr=LR, steps=4)
    loss, _ = meta_batch(checkpointed_maml(model, inner_lr=LR, steps=4, checkpoints=2).meta_loss)(params, tasks)
    loss.backward()
    assert tree_relative_error({k: v.grad for k, v in params.items()}, reference) < 1e-10


@pytest.mark.parametrize("hvp", ["forward", "reverse"])
def test_partial_adaptation_collects_mixed_terms(float64, hvp):
    # ANIL-style: only the head adapts, yet the body's meta-gradient includes d^2 L / d body d head (forward mode
    # gets them from the symmetry of the Hessian, reverse mode from the step's vjp).
    net = _net()
    model, params = functionalize(net)
    tasks = _tasks()
    is_head = lambda k: k.startswith("head")  # noqa: E731
    reference = reference_maml_gradient(net, params, tasks, lr=LR, steps=5, adapt=is_head)
    got, _, _ = _meta_gradient(checkpointed_maml(model, inner_lr=LR, steps=5, adapt="head", hvp=hvp), params, tasks,
                               "vmap")
    assert tree_relative_error(got, reference) < 1e-10
    assert tree_norm({k: v for k, v in got.items() if not is_head(k)}) > 0


def test_clip_norm_clips_the_backward_signal(float64):
    # With one step, the signal after the step is the whole meta-gradient of one task: clipping rescales it.
    net = _net()
    model, params = functionalize(net)
    tasks = _tasks(1)
    exact, _, _ = _meta_gradient(maml(model, inner_lr=LR, steps=1), params, tasks, "loop")
    norm = float(tree_norm(exact))
    loose, _, _ = _meta_gradient(checkpointed_maml(model, inner_lr=LR, steps=1, clip_norm=10 * norm), params, tasks,
                                 "vmap")
    tight, _, _ = _meta_gradient(checkpointed_maml(model, inner_lr=LR, steps=1, clip_norm=norm / 4), params, tasks,
                                 "vmap")
    assert tree_relative_error(loose, exact) < 1e-10
    assert tree_relative_error(tight, tree_scale(exact, 0.25)) < 1e-8


def test_checkpoint_positions():
    assert checkpoint_positions(10, 3) == [0, 3, 7]
    assert checkpoint_positions(5, 5) == [0, 1, 2, 3, 4]
    assert checkpoint_positions(100, 1) == [0]
    assert default_checkpoints(100) == 10 and default_checkpoints(1) == 1 and default_checkpoints(50) == 8


@pytest.mark.parametrize("bad", [0, -1, 8])
def test_checkpoints_out_of_range(bad):
    model, _ = functionalize(_net())
    with pytest.raises(ValueError, match=rf"checkpointed_maml: checkpoints must be between 1 and steps=7 \(got {bad}\)"):
        checkpointed_maml(model, inner_lr=0.1, steps=7, checkpoints=bad)


def test_bad_arguments():
    model, _ = functionalize(_net())
    with pytest.raises(TypeError, match="checkpointed_maml: checkpoints must be an int"):
        checkpointed_maml(model, inner_lr=0.1, steps=7, checkpoints=2.5)
    with pytest.raises(ValueError, match=r"checkpointed_maml: clip_norm must be > 0 \(got 0\)"):
        checkpointed_maml(model, inner_lr=0.1, steps=7, clip_norm=0)
    with pytest.raises(ValueError, match=r"checkpointed_maml: inner_lr must be > 0 \(got -0.1\)"):
        checkpointed_maml(model, inner_lr=-0.1, steps=7)
    with pytest.raises(ValueError, match=r"checkpointed_maml: hvp must be one of 'forward', 'reverse' \(got 'fwd'\)"):
        checkpointed_maml(model, inner_lr=0.1, steps=7, hvp="fwd")
    with pytest.raises(TypeError, match="checkpointed_maml: model must be a pure function"):
        checkpointed_maml(_net(), inner_lr=0.1, steps=7)


def test_torch_norm_layers_refused_under_vmap():
    module = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.ReLU(), nn.Linear(6, 3))
    model, params = functionalize(module)
    learner = checkpointed_maml(model, inner_lr=0.1, steps=2)
    with pytest.raises(ValueError, match="checkpointed_maml: the model has torch norm layers"):
        meta_batch(learner.meta_loss, mode="vmap")(params, _tasks())


def test_registry_builds_every_path_and_rejects_unknown_names():
    model, params = functionalize(_net())
    assert set(path_names()) == {"exact", "first_order", "checkpointed", "one_step", "implicit"}
    for name in path_names():
        learner = learner_for_path(name).build(model, inner_lr=0.1, steps=2)
        loss, _ = meta_batch(learner.meta_loss)(params, _tasks())
        assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="unknown gradient path 'exactly'; choose one of 'exact'"):
        learner_for_path("exactly")
    with pytest.raises(TypeError, match=r"one_step: unknown option\(s\) \['checkpoints'\]"):
        learner_for_path("one_step").build(model, inner_lr=0.1, steps=2, checkpoints=2)
    with pytest.raises(ValueError, match="checkpointed_maml: checkpoints must be between 1 and steps=2"):
        learner_for_path("checkpointed").build(model, inner_lr=0.1, steps=2, checkpoints=3)


def test_torch_func_grad_over_the_meta_batch(float64):
    # the surrogate loss carries the meta-gradient through torch.func.grad as well as through loss.backward()
    net = _net()
    model, params = functionalize(net)
    tasks = _tasks()
    reference = reference_maml_gradient(net, params, tasks, lr=LR, steps=3)
    learner = checkpointed_maml(model, inner_lr=LR, steps=3)
    got = torch.func.grad(lambda p: meta_batch(learner.meta_loss, validate=False)(p, tasks)[0])(params)
    assert tree_relative_error(got, reference) < 1e-10
