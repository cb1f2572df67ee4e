"""metafunc's norm layers equal torch's, and converting a model fixes its second-order meta-gradient under vmap."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from reference import reference_meta_gradient, relative_error
from torch import nn

from metafunc import (
    BatchNorm,
    GroupNorm,
    LayerNorm,
    Task,
    anil,
    convert_norm_layers,
    find_torch_norm_layers,
    fomaml,
    functionalize,
    maml,
    meta_batch,
)

f64 = torch.float64


def _input_and_weight_grads(layer: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    loss = (out * target).sum()
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad(loss, [x, *params])
    return out.detach(), grads


NORM_PAIRS = {
    "batchnorm2d": (lambda: nn.BatchNorm2d(4, track_running_stats=False), (6, 4, 5, 5)),
    "batchnorm1d": (lambda: nn.BatchNorm1d(4, track_running_stats=False), (6, 4)),
    "batchnorm1d-sequence": (lambda: nn.BatchNorm1d(4, track_running_stats=False), (6, 4, 7)),
    "layernorm": (lambda: nn.LayerNorm(4), (6, 3, 4)),
    "layernorm-2d-shape": (lambda: nn.LayerNorm((3, 4)), (6, 3, 4)),
    "layernorm-no-bias": (lambda: nn.LayerNorm(4, bias=False), (6, 4)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (6, 4, 5, 5)),
    "instancenorm2d": (lambda: nn.InstanceNorm2d(4, affine=True), (6, 4, 5, 5)),
}


@pytest.mark.parametrize("name", list(NORM_PAIRS))
def test_exact_layer_equals_torch_layer_forward_and_first_order(name):
    make, shape = NORM_PAIRS[name]
    torch.manual_seed(0)
    theirs = make().to(f64)
    with torch.no_grad():  # non-trivial affine parameters
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    ours = convert_norm_layers(theirs)
    assert type(ours).__module__ == "metafunc.nn.norm" and find_torch_norm_layers(ours) == []
    x = 3 * torch.randn(shape, dtype=f64) + 1
    out_theirs, grads_theirs = _input_and_weight_grads(theirs, x)
    out_ours, grads_ours = _input_and_weight_grads(ours, x)
    assert torch.allclose(out_ours, out_theirs, rtol=1e-10, atol=1e-12)
    assert len(grads_ours) == len(grads_theirs)
    for a, b in zip(grads_ours, grads_theirs):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
    # The same under torch.func transforms (where metafunc's layers compute from elementary ops), first order.
    target = torch.randn(out_theirs.shape, generator=torch.Generator().manual_seed(9), dtype=f64)
    params = {k: v.detach() for k, v in ours.named_parameters()}

    def objective(p, inp):
        return (torch.func.functional_call(ours, p, (inp,)) * target).sum()

    batched = torch.func.vmap(lambda inp: torch.func.functional_call(ours, params, (inp,)))(x.unsqueeze(0))[0]
    assert torch.allclose(batched, out_theirs, rtol=1e-10, atol=1e-12)
    grad_x = torch.func.grad(objective, argnums=1)(params, x)
    grad_p = torch.func.grad(objective)(params, x)
    assert torch.allclose(grad_x, grads_theirs[0], rtol=1e-9, atol=1e-11)
    for a, b in zip(grad_p.values(), grads_theirs[1:]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


def test_exact_layers_reject_wrong_input_shapes():
    with pytest.raises(ValueError, match=r"BatchNorm: expected input \(N, 4, \.\.\.\)"):
        BatchNorm(4)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="LayerNorm: expected input ending in"):
        LayerNorm(4)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="GroupNorm: num_channels must be divisible by num_groups"):
        GroupNorm(3, 4)
    with pytest.raises(ValueError, match="BatchNorm: eps must be > 0"):
        BatchNorm(4, eps=0.0)


# --- a torchvision-style CNN and a transformer encoder, written with torch's nn modules -------------------------


class BasicBlock(nn.Module):
    """A ResNet basic block as torchvision writes it (conv-bn-relu-conv-bn plus a projected shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int, track: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, track_running_stats=track)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, track_running_stats=track)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout, track_running_stats=track))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class TinyResNet(nn.Module):
    def __init__(self, ways: int = 3, width: int = 4, track: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width, track_running_stats=track),
                                  nn.ReLU())
        self.layer1 = BasicBlock(width, width, 2, track)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, ways)

    def forward(self, x):
        return self.head(self.pool(self.layer1(self.stem(x))).flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 8, ways: int = 3):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, ways)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def _image_tasks(num_tasks=2, ways=3, size=8) -> Task:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(ways).repeat(num_tasks, 1)
    return Task(torch.randn(num_tasks, ways, 1, size, size, generator=g, dtype=f64), y,
                torch.randn(num_tasks, ways, 1, size, size, generator=g, dtype=f64), y.clone())


def _sequence_tasks(num_tasks=2, ways=3, length=4, d=8) -> Task:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(ways).repeat(num_tasks, 1)
    return Task(torch.randn(num_tasks, ways, length, d, generator=g, dtype=f64), y,
                torch.randn(num_tasks, ways, length, d, generator=g, dtype=f64), y.clone())


def _meta_gradient(learner, params, tasks, **kwargs):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss, _ = meta_batch(learner.meta_loss, **kwargs)(leaves, tasks)
    loss.backward()
    return {k: v.grad for k, v in leaves.items()}


MODELS = {
    "resnet-batchnorm": (lambda: TinyResNet(track=False), _image_tasks),
    "transformer-layernorm": (lambda: TinyTransformer(), _sequence_tasks),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_conversion_keeps_outputs_and_parameter_names(name, train):
    torch.manual_seed(0)
    net = MODELS[name][0]().to(f64).train(train)
    converted = convert_norm_layers(net)
    assert find_torch_norm_layers(net) and not find_torch_norm_layers(converted)  # the input is not mutated
    assert [k for k, _ in net.named_parameters()] == [k for k, _ in converted.named_parameters()]
    converted.load_state_dict(net.state_dict(), strict=False)  # a state_dict still loads
    x = MODELS[name][1]().support_x[0]
    with torch.no_grad():
        assert torch.allclose(converted(x), net(x), rtol=1e-10, atol=1e-12)


def test_conversion_with_running_stats_matches_the_eval_mode_model():
    torch.manual_seed(0)
    net = TinyResNet(track=True).to(f64)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 1, 8, 8, dtype=f64) * 2 + 1)  # non-trivial running statistics
    net.eval()
    converted = convert_norm_layers(net, batch_norm="running_stats")
    x = torch.randn(4, 1, 8, 8, dtype=f64)
    with torch.no_grad():
        assert torch.allclose(converted(x), net(x), rtol=1e-10, atol=1e-12)
    assert torch.equal(converted.stem[1].running_mean, net.stem[1].running_mean)
    with pytest.raises(ValueError, match="batch_norm='running_stats' needs layers that track running statistics"):
        convert_norm_layers(TinyResNet(track=False), batch_norm="running_stats")


@pytest.mark.parametrize("name, train", [("resnet-batchnorm", True), ("transformer-layernorm", True),
                                         ("transformer-layernorm", False)],
                         ids=["resnet-batchnorm-train", "transformer-layernorm-train", "transformer-layernorm-eval"])
def test_converted_model_has_exact_second_order_gradients_under_vmap_and_unconverted_does_not(name, train):
    torch.manual_seed(0)
    make, make_tasks = MODELS[name]
    net = make().to(f64).train(train)
    tasks = make_tasks()
    model, params = functionalize(net)
    reference = reference_meta_gradient(net, params, tasks, algorithm="maml", inner_lr=0.5, steps=1,
                                        loss="cross_entropy")
    # torch's fused norm kernels: the loop is right, vmap is silently wrong at second order.
    wrong = _meta_gradient(maml(model, inner_lr=0.5, steps=1), params, tasks, mode="vmap", validate=False)
    loop = _meta_gradient(maml(model, inner_lr=0.5, steps=1), params, tasks, mode="loop")
    assert relative_error(wrong, reference) > 1e-4
    assert relative_error(loop, reference) < 1e-10
    # Converted: exact under vmap.
    exact_model, exact_params = functionalize(convert_norm_layers(net))
    exact = _meta_gradient(maml(exact_model, inner_lr=0.5, steps=1), exact_params, tasks, mode="vmap")
    assert relative_error(exact, reference) < 1e-10


@pytest.mark.parametrize("name", list(MODELS))
def test_learner_refuses_torch_norm_layers_under_vmap_at_second_order(name):
    torch.manual_seed(0)
    make, make_tasks = MODELS[name]
    model, params = functionalize(make().to(f64))
    tasks = make_tasks()
    layer = "stem.1 (BatchNorm2d)" if name.startswith("resnet") else "encoder.layers.0.norm1 (LayerNorm)"
    for learner in (maml(model, inner_lr=0.5), anil(model, inner_lr=0.5)):
        with pytest.raises(ValueError, match=rf"{learner.name}: the model has torch norm layers .*{re.escape(layer)}.*"
                                             r"convert_norm_layers\(module\)"):
            meta_batch(learner.meta_loss, mode="vmap")(params, tasks)
    # First order (no double backward) and the loop mode are allowed, and right.
    first = _meta_gradient(fomaml(model, inner_lr=0.5), params, tasks, mode="vmap")
    reference = reference_meta_gradient(model.module, params, tasks, algorithm="fomaml",
                                        inner_lr=0.5, steps=1, loss="cross_entropy")
    assert relative_error(first, reference) < 1e-10


def test_learner_refuses_batchnorm_that_tracks_running_stats_with_the_fix():
    model, params = functionalize(TinyResNet(track=True).to(f64))
    with pytest.raises(ValueError, match=r"fomaml: the model has torch BatchNorm layers \['stem.1 \(BatchNorm2d\)'.*"
                                         r"convert_norm_layers\(module\).*track_running_stats=False"):
        meta_batch(fomaml(model, inner_lr=0.5).meta_loss, mode="loop")(params, _image_tasks())


def test_convert_norm_layers_validates_its_arguments():
    with pytest.raises(TypeError, match="convert_norm_layers: module must be an nn.Module"):
        convert_norm_layers(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="convert_norm_layers: batch_norm must be 'batch_stats' or 'running_stats'"):
        convert_norm_layers(nn.BatchNorm2d(3), batch_norm="running")  # type: ignore[arg-type]
    net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    same = convert_norm_layers(net, inplace=True)
    assert same is net and isinstance(net[1], LayerNorm)


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "layer"])
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_second_order_meta_gradient_of_every_converted_norm_layer_equals_torch_autograd(norm, mode):
    """BatchNorm, GroupNorm, InstanceNorm and LayerNorm: metafunc's exact layers (converted from torch's) under vmap
    and in a loop give the second-order MAML meta-gradient of the plain autograd loop on torch's own module, judged
    with the reference's own error function."""
    from reference import torch_conv4, torch_mlp

    torch.manual_seed(0)
    if norm == "layer":
        net = torch_mlp(6, (8, 8), 3, layer_norm=True).to(f64)
        g = torch.Generator().manual_seed(0)
        y = torch.arange(3).repeat(2, 2)
        tasks = Task(torch.randn(2, 6, 6, generator=g, dtype=f64), y, torch.randn(2, 6, 6, generator=g, dtype=f64), y)
    else:
        net = torch_conv4(3, width=4, image_size=16, norm=norm).to(f64)
        tasks = _image_tasks(size=16)
    exact_model, params = functionalize(convert_norm_layers(net))
    assert not find_torch_norm_layers(exact_model.module)
    reference = reference_meta_gradient(net, params, tasks, algorithm="maml", inner_lr=0.5, steps=2,
                                        loss="cross_entropy")
    got = _meta_gradient(maml(exact_model, inner_lr=0.5, steps=2), params, tasks, mode=mode)
    assert sum(float(v.norm()) for v in reference.values()) > 0
    assert relative_error(got, reference) < 1e-10
