"""functionalize: a pure model(params, x) that never mutates the module and insists on exact parameter names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metafunc import FunctionalModel, check_params, functionalize, maml, meta_batch, models, sinusoid_tasks


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_params_are_fresh_leaves_equal_to_the_modules_and_the_model_is_pure():
    torch.manual_seed(0)
    net = models.mlp(1, (8, 8), 1, norm="layer")
    model, params = functionalize(net)
    assert list(params) == [k for k, _ in net.named_parameters()]
    for name, p in net.named_parameters():
        assert params[name].is_leaf and params[name].requires_grad
        assert torch.equal(params[name], p) and params[name].data_ptr() != p.data_ptr()
    x = torch.randn(5, 1)
    assert torch.equal(model(params, x), net(x))
    shifted = {k: v + 1.0 for k, v in params.items()}
    assert not torch.allclose(model(shifted, x), net(x))
    assert torch.equal(model(params, x), model(params, x))


def test_functionalize_and_a_meta_step_leave_the_module_untouched():
    torch.manual_seed(0)
    net = models.mlp(1, (8,), 1)
    before = _state(net)
    model, params = functionalize(net)
    learner = maml(model, inner_lr=0.1, steps=2, loss="mse")
    optimizer = torch.optim.SGD(params.values(), lr=0.5)
    loss, _ = meta_batch(learner.meta_loss)(params, sinusoid_tasks(2, shots=4, generator=torch.Generator().manual_seed(0)))
    loss.backward()
    optimizer.step()
    after = _state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters())
    assert not torch.equal(params["head.weight"].detach(), net.head.weight.detach())  # the copy moved, not the module


def test_buffers_are_constants_copied_from_the_module():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
    with torch.no_grad():
        net[1].running_mean.fill_(3.0)
    model, params = functionalize(net)
    assert set(model.buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    net[1].running_mean.fill_(0.0)  # later changes to the module do not leak into the model
    assert torch.equal(model.buffers["1.running_mean"], torch.full((2,), 3.0))
    x = torch.randn(4, 2)
    expected = (net[0](x) - 3.0) / torch.sqrt(torch.ones(2) + 1e-5) * net[1].weight + net[1].bias
    assert torch.allclose(model(params, x), expected, atol=1e-6)


def test_parameter_names_are_strict():
    model, params = functionalize(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    missing = {"weight": params["weight"]}
    with pytest.raises(RuntimeError, match="bias"):
        model(missing, x)
    with pytest.raises(RuntimeError, match="extra"):
        model({**params, "extra": torch.ones(1)}, x)
    with pytest.raises(ValueError, match=r"^maml: params is missing \['bias'\]"):
        check_params(missing, model, caller="maml")
    check_params({**params, "inner_lr/weight": torch.ones(2, 3)}, model, caller="meta_sgd")  # extra keys are fine
    with pytest.raises(TypeError, match=r"^maml: params must be a dict of tensors"):
        check_params(list(params.values()), model, caller="maml")


def test_torch_norm_layers_are_listed_and_repr():
    model, _ = functionalize(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LayerNorm(8)))
    assert model.torch_norm_layers == ["1 (BatchNorm2d)", "3 (LayerNorm)"]
    exact, _ = functionalize(models.conv4(width=4))
    assert exact.torch_norm_layers == []
    assert repr(model) == "FunctionalModel(Sequential, 6 parameter tensors)"
    assert isinstance(model, FunctionalModel) and model.__name__ == "Sequential"


def test_init_params_and_frozen_parameters():
    net = nn.Linear(2, 2)
    net.bias.requires_grad_(False)
    model, params = functionalize(net)
    assert params["weight"].requires_grad and not params["bias"].requires_grad
    again = model.init_params()
    assert again["weight"].data_ptr() != params["weight"].data_ptr()


def test_functional_model_composes_with_vmap_and_grad():
    torch.manual_seed(0)
    model, params = functionalize(models.mlp(1, (8,), 1, norm="layer"))
    xs = torch.randn(3, 5, 1)
    batched = torch.func.vmap(lambda x: model(params, x))(xs)
    assert torch.allclose(batched, torch.stack([model(params, x) for x in xs]), atol=1e-6)
    grads = torch.func.grad(lambda p: model(p, xs[0]).sum())({k: v.detach() for k, v in params.items()})
    assert list(grads) == list(params)


def test_task_container():
    from metafunc import Task
    tasks = Task(torch.randn(3, 4, 2), torch.randint(0, 2, (3, 4)), torch.randn(3, 5, 2), torch.randint(0, 2, (3, 5)))
    assert tasks.num_tasks == 3 and tasks[0] is tasks.support_x  # an int index picks a field
    one = tasks.task_at(1)
    assert one.support_x.shape == (4, 2) and torch.equal(one.query_y, tasks.query_y[1])
    wide = tasks.to(torch.float64)
    assert wide.support_x.dtype == torch.float64 and wide.support_y.dtype == torch.int64  # labels keep their dtype
    assert tasks.to(dtype=torch.float64).query_y.dtype == torch.int64


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_meta_batch_of_a_plain_per_task_function(mode):
    from metafunc import Task
    tasks = Task(torch.randn(4, 3, 2), torch.randn(4, 3), torch.randn(4, 2, 2), torch.randn(4, 2))
    w = torch.tensor([1.0, -2.0])

    def per_task(params, task):
        return (task.support_x @ params["w"] - task.support_y).pow(2).mean()

    loss, metrics = meta_batch(per_task, mode=mode, reduce="none")({"w": w}, tasks)
    expected = torch.stack([per_task({"w": w}, tasks.task_at(i)) for i in range(4)])
    assert metrics == {} and torch.allclose(loss, expected)
    assert meta_batch(per_task, mode=mode).__name__ == "per_task"  # functools.wraps keeps the name
