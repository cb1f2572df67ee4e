"""ResNet-12 from metafunc's exact norm layers: shapes, parameter count, names, DropBlock, and an exact second-order
meta-gradient under vmap against the plain-autograd reference."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import reference_meta_gradient, relative_error
from torch import nn

import metafunc
from metafunc import Task, functionalize, maml, meta_batch
from metafunc.nn.norm import BatchNorm, find_torch_norm_layers
from metafunc.nn.resnet12 import RESNET12_WIDTHS, DropBlock, resnet12


def _conv_and_norm_parameters(widths, in_channels=3):
    total, channels = 0, in_channels
    for w in widths:
        total += channels * w * 9 + 2 * w * w * 9 + channels * w  # three 3x3 convs and the 1x1 shortcut, no bias
        total += 4 * 2 * w                                         # four BatchNorms (weight and bias)
        channels = w
    return total


def test_standard_resnet12_shapes_and_parameter_count():
    encoder = resnet12(ways=None)
    n = sum(p.numel() for p in encoder.parameters())
    assert n == _conv_and_norm_parameters(RESNET12_WIDTHS) == 12_424_320   # "12.4M" of MetaOptNet
    head = resnet12(ways=5)
    assert sum(p.numel() for p in head.parameters()) == n + 640 * 5 + 5
    assert [k for k, _ in head.named_parameters() if k.startswith("head")] == ["head.weight", "head.bias"]
    assert not [k for k, _ in encoder.named_parameters() if k.startswith("head")]
    assert find_torch_norm_layers(head) == [] and sum(isinstance(m, BatchNorm) for m in head.modules()) == 16
    assert metafunc.resnet12 is resnet12 and "resnet12" in metafunc.__all__ and metafunc.nn.resnet12 is resnet12
    with torch.no_grad():
        x84, x32 = torch.randn(2, 3, 84, 84), torch.randn(2, 3, 32, 32)
        assert encoder.layer4(encoder.layer3(encoder.layer2(encoder.layer1(x84)))).shape == (2, 640, 5, 5)
        assert encoder.layer4(encoder.layer3(encoder.layer2(encoder.layer1(x32)))).shape == (2, 640, 2, 2)
        assert encoder(x84).shape == (2, 640) and encoder(x32).shape == (2, 640)
        assert head(x84).shape == (2, 5) and head(x32).shape == (2, 5)


def test_block_structure():
    block = resnet12(ways=None, widths=(4, 6, 8, 10)).layer2
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == [
        (4, 6, (3, 3), None), (6, 6, (3, 3), None), (6, 6, (3, 3), None), (4, 6, (1, 1), None)]
    assert isinstance(block.act, nn.LeakyReLU) and block.act.negative_slope == 0.1
    assert isinstance(block.drop, nn.Identity)                               # drop_rate=0: no regularisation
    net = resnet12(ways=None, widths=(4, 6, 8, 10), drop_rate=0.1)
    assert [type(b.drop).__name__ for b in (net.layer1, net.layer2, net.layer3, net.layer4)] == [
        "Dropout", "Dropout", "DropBlock", "DropBlock"]
    assert net.layer3.drop.block_size == 5 and net.layer4.drop.drop_rate == 0.1


def test_dropblock_drops_squares_and_rescales():
    torch.manual_seed(0)
    drop = DropBlock(drop_rate=0.2, block_size=3)
    out = drop(torch.ones(8, 16, 20, 20))
    dropped = (out == 0).float().mean()
    assert 0.13 < float(dropped) < 0.27                                 # about drop_rate of the units
    assert abs(float(out.mean()) - 1.0) < 1e-5                          # the rest rescaled: the mean is kept
    kept = out[out != 0]
    assert torch.allclose(kept, kept[0].expand_as(kept))                # one scale for all kept units
    # a lone seed gives a full 3x3 square: every dropped unit has a dropped 3x3 block around it
    mask = (out == 0).float().flatten(0, 1)[:, None]
    eroded = -nn.functional.max_pool2d(-nn.functional.pad(mask, (1, 1, 1, 1), value=1.0), 3, stride=1)
    opened = nn.functional.max_pool2d(nn.functional.pad(eroded, (1, 1, 1, 1)), 3, stride=1)
    assert torch.equal(opened, mask)
    assert torch.equal(drop.eval()(torch.ones(2, 3, 4, 4)), torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"DropBlock: drop_rate must be in \[0, 1\) \(got 1.5\)"):
        DropBlock(1.5)


def _tiny_tasks(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2]] * 2)
    return Task(torch.randn(2, 6, 3, 16, 16, generator=g, dtype=dtype), labels,
                torch.randn(2, 6, 3, 16, 16, generator=g, dtype=dtype), labels)


def _torch_twin(module: nn.Module) -> nn.Module:
    """The same network with torch's own ``nn.BatchNorm2d(track_running_stats=False)`` (batch statistics)."""
    twin = copy.deepcopy(module)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BatchNorm):
                bn = nn.BatchNorm2d(child.num_features, eps=child.eps, track_running_stats=False).to(child.weight)
                with torch.no_grad():
                    bn.weight.copy_(child.weight)
                    bn.bias.copy_(child.bias)
                setattr(parent, name, bn)
    return twin


def test_second_order_maml_meta_gradient_is_exact_under_vmap(float64):
    torch.manual_seed(0)
    module = resnet12(ways=3, widths=(2, 3, 4, 5))
    with torch.no_grad():   # non-trivial norm weights, so their gradients are checked too
        for m in module.modules():
            if isinstance(m, BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    tasks = _tiny_tasks()
    model, params = functionalize(module)
    learner = maml(model, inner_lr=0.1, steps=2)

    def gradient(mode):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        loss, _ = meta_batch(learner.meta_loss, mode=mode)(leaves, tasks)
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    options = dict(algorithm="maml", inner_lr=0.1, steps=2, loss="cross_entropy")
    on_module = reference_meta_gradient(module, params, tasks, **options)
    on_torch_layers = reference_meta_gradient(_torch_twin(module), params, tasks, **options)
    assert sum(float(g.norm()) for g in on_torch_layers.values()) > 0
    assert all(float(on_torch_layers[k].norm()) > 0 for k in params if k.endswith(("bn1.weight", "head.weight")))
    assert relative_error(on_module, on_torch_layers) < 1e-10
    assert relative_error(gradient("vmap"), on_torch_layers) < 1e-10
    assert relative_error(gradient("loop"), on_torch_layers) < 1e-10


def test_dropblock_under_vmap_is_refused_and_eval_mode_runs():
    torch.manual_seed(0)
    module = resnet12(ways=3, widths=(2, 3, 4, 5), drop_rate=0.1)
    tasks = _tiny_tasks(torch.float32)
    model, params = functionalize(module)
    learner = maml(model, inner_lr=0.1, steps=1)
    with pytest.raises(ValueError, match=r"meta_batch: the per-task function draws random numbers under vmap "
                                         r"\(dropout in training mode\?\).*use meta_batch\(..., mode='loop'\)"):
        meta_batch(learner.meta_loss, mode="vmap")(params, tasks)
    loss, _ = meta_batch(learner.meta_loss, mode="loop")(params, tasks)   # the loop draws per task
    assert torch.isfinite(loss)
    module.eval()                                                         # no draws: vmap runs and agrees
    vmapped, _ = meta_batch(learner.meta_loss, mode="vmap")(params, tasks)
    looped, _ = meta_batch(learner.meta_loss, mode="loop")(params, tasks)
    assert abs(vmapped.item() - looped.item()) < 1e-5


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"resnet12: widths must be four positive ints, e.g. \(64, 160, 320, 640\) "
                                         r"\(got \(64, 160\)\)"):
        resnet12(widths=(64, 160))
    with pytest.raises(ValueError, match=r"resnet12: ways must be a positive int, or None for an encoder without "
                                         r"head \(got 0\)"):
        resnet12(ways=0)
    with pytest.raises(ValueError, match=r"resnet12: drop_rate must be a number in \[0, 1\) \(got -0.1\)"):
        resnet12(drop_rate=-0.1)
    with pytest.raises(ValueError, match=r"resnet12: block_size must be a positive int \(got 0\)"):
        resnet12(block_size=0)
