"""ResNet-18 from metafunc's exact norm layers: shapes, parameter count, names, and an exact meta-gradient."""

from __future__ import annotations

import pytest
import torch

from metafunc import Task, functionalize, maml, meta_batch
from metafunc.core.tree import tree_relative_error
from metafunc.gradients import checkpointed_maml
from metafunc.nn.norm import BatchNorm, find_torch_norm_layers
from metafunc.nn.resnet import resnet18


def test_standard_resnet18_shapes_and_parameter_count():
    net = resnet18(ways=1000)
    # torchvision.models.resnet18() has 11,689,512 parameters; ours has the same layers.
    assert sum(p.numel() for p in net.parameters()) == 11_689_512
    assert net.embed(torch.randn(1, 3, 224, 224)).shape == (1, 512)
    assert find_torch_norm_layers(net) == []
    assert sum(isinstance(m, BatchNorm) for m in net.modules()) == 20
    assert [k for k, _ in net.named_parameters() if k.startswith("head")] == ["head.weight", "head.bias"]


def test_small_variant_keeps_resolution_until_stage_two():
    net = resnet18(ways=5, variant="small", width=4)
    x = torch.randn(2, 3, 16, 16)
    assert net.layer1(net.stem(x)).shape == (2, 4, 16, 16)
    assert net(x).shape == (2, 5)
    assert net.feature_dim == 32


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"resnet18: variant must be one of 'imagenet', 'small' \(got 'tiny'\)"):
        resnet18(variant="tiny")
    with pytest.raises(ValueError, match=r"resnet18: width must be a positive int \(got 0\)"):
        resnet18(width=0)


@pytest.mark.parametrize("hvp", ["forward", "reverse"])
@pytest.mark.parametrize("variant,size", [("small", 8), ("imagenet", 32)])
def test_checkpointed_meta_gradient_on_tiny_resnet(float64, variant, size, hvp):
    # "imagenet" has the 7x7 stride-2 stem and the max-pool: forward mode goes through their backward formulas too.
    model, params = functionalize(resnet18(ways=2, variant=variant, width=2))
    g = torch.Generator().manual_seed(0)
    tasks = Task(torch.randn(2, 4, 3, size, size, generator=g), torch.randint(0, 2, (2, 4), generator=g),
                 torch.randn(2, 4, 3, size, size, generator=g), torch.randint(0, 2, (2, 4), generator=g))
    loss, _ = meta_batch(maml(model, inner_lr=0.1, steps=2).meta_loss, mode="loop")(params, tasks)
    exact = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    loss, _ = meta_batch(checkpointed_maml(model, inner_lr=0.1, steps=2, checkpoints=1, hvp=hvp).meta_loss)(params,
                                                                                                           tasks)
    got = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    assert tree_relative_error(got, exact) < 1e-10
