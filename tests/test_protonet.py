"""Prototypical Networks: exact against a hand-written autograd loop, finite differences, eager errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metafunc import Task, convert_norm_layers, functionalize, meta_batch, protonet, prototypes
from metafunc.algorithms.protonet import PROTOTYPES_KEY, squared_distances
from metafunc.core.tree import tree_relative_error


def torch_encoder() -> nn.Module:
    """A tiny encoder with torch's own LayerNorm (the reference runs on it as is)."""
    return nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 4))


def few_shot_tasks(num_tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 2, features: int = 3,
                   seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)

    def labels(per_class: int) -> torch.Tensor:
        base = torch.arange(ways).repeat_interleave(per_class)
        return torch.stack([base[torch.randperm(base.numel(), generator=g)] for _ in range(num_tasks)])

    return Task(torch.randn(num_tasks, ways * shots, features, generator=g), labels(shots),
                torch.randn(num_tasks, ways * queries, features, generator=g), labels(queries))


def reference_protonet_loss(module: nn.Module, params: dict, tasks: Task, ways: int) -> torch.Tensor:
    """Mean query cross-entropy, class means by boolean masks and distances by the expansion |q|^2 - 2qc + |c|^2."""
    total = 0.0
    for i in range(tasks.num_tasks):
        xs, ys, xq, yq = tasks.task_at(i)
        zs, zq = functional_call(module, params, (xs,)), functional_call(module, params, (xq,))
        c = torch.stack([zs[ys == k].mean(0) for k in range(ways)])
        d2 = (zq ** 2).sum(1, keepdim=True) - 2 * zq @ c.T + (c ** 2).sum(1)
        total = total + F.cross_entropy(-d2, yq)
    return total / tasks.num_tasks


def leaves(params: dict) -> dict:
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def meta_gradient(learner, params, tasks, **kwargs):
    p = leaves(params)
    loss, metrics = meta_batch(learner.meta_loss, **kwargs)(p, tasks)
    return loss, metrics, dict(zip(p, torch.autograd.grad(loss, list(p.values()))))


@pytest.mark.parametrize("mode,chunk", [("vmap", None), ("vmap", 2), ("loop", None)])
def test_meta_gradient_equals_autograd_reference(float64, mode, chunk):
    module = torch_encoder()
    encoder, params = functionalize(convert_norm_layers(module))
    tasks = few_shot_tasks()
    loss, metrics, grads = meta_gradient(protonet(encoder), params, tasks, mode=mode, chunk_size=chunk)
    ref_params = leaves(params)
    ref_loss = reference_protonet_loss(module, ref_params, tasks, 3)
    ref = dict(zip(ref_params, torch.autograd.grad(ref_loss, list(ref_params.values()))))
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert tree_relative_error(grads, ref) < 1e-10
    assert 0.0 <= metrics["accuracy"].item() <= 1.0


def test_meta_gradient_equals_finite_differences(float64):
    module = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))
    encoder, params = functionalize(convert_norm_layers(module))
    tasks = few_shot_tasks(num_tasks=2, shots=1, queries=1)
    _, _, grads = meta_gradient(protonet(encoder), params, tasks)
    eps = 1e-6
    fd = {}
    for name, value in params.items():
        flat = torch.zeros(value.numel())
        for j in range(value.numel()):
            plus, minus = value.detach().clone(), value.detach().clone()
            plus.view(-1)[j] += eps
            minus.view(-1)[j] -= eps
            f = [reference_protonet_loss(module, {**params, name: v}, tasks, 3).item() for v in (plus, minus)]
            flat[j] = (f[0] - f[1]) / (2 * eps)
        fd[name] = flat.view_as(value)
    assert tree_relative_error(grads, fd) < 1e-7


def test_prototypes_are_class_means_and_logits_negative_squared_distances(float64):
    z = torch.randn(6, 4)
    y = torch.tensor([2, 0, 1, 0, 2, 1])
    c = prototypes(z, y, 3)
    assert torch.allclose(c, torch.stack([z[y == k].mean(0) for k in range(3)]), rtol=0, atol=1e-14)
    q = torch.randn(5, 4)
    assert torch.allclose(squared_distances(q, c), torch.cdist(q, c) ** 2, atol=1e-12)


def test_adapt_and_predict_give_the_meta_loss_logits(float64):
    encoder, params = functionalize(convert_norm_layers(torch_encoder()))
    task = few_shot_tasks(num_tasks=1).task_at(0)
    learner = protonet(encoder)
    task_params, support_loss = learner.adapt(params, task.support_x, task.support_y)
    assert task_params[PROTOTYPES_KEY].shape == (3, 4) and support_loss.shape == (1,)
    logits = learner.predict(task_params, task.query_x)
    loss, metrics = learner.meta_loss(params, task)
    assert torch.allclose(F.cross_entropy(logits, task.query_y), loss, rtol=1e-12)
    assert torch.allclose((logits.argmax(-1) == task.query_y).double().mean(), metrics["accuracy"])


@pytest.mark.slow
def test_learns_separable_gaussian_classes():
    """Meta-training on tasks drawn from 8 Gaussian clusters lifts held-out 3-way accuracy well above chance."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(8, 3, generator=g) * 2
    stretch = torch.diag(torch.tensor([12.0, 0.3, 0.3]))  # a nuisance direction the encoder must learn to shrink

    def sample(classes: list[int], n_tasks: int) -> Task:
        xs, ys, xq, yq = [], [], [], []
        for _ in range(n_tasks):
            pick = torch.tensor(classes)[torch.randperm(len(classes), generator=g)[:3]]
            s = centres[pick].repeat_interleave(2, 0) + torch.randn(6, 3, generator=g) @ stretch
            q = centres[pick].repeat_interleave(3, 0) + torch.randn(9, 3, generator=g) @ stretch
            xs.append(s), ys.append(torch.arange(3).repeat_interleave(2)), xq.append(q), yq.append(torch.arange(3).repeat_interleave(3))
        return Task(torch.stack(xs), torch.stack(ys), torch.stack(xq), torch.stack(yq))

    encoder, params = functionalize(nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 8)))
    learner = protonet(encoder, ways=3)
    test = sample([5, 6, 7], 50)
    before = meta_batch(learner.evaluate)(params, test)[1]["accuracy"].item()
    opt = torch.optim.Adam(params.values(), lr=3e-2)
    for _ in range(40):
        loss, _ = meta_batch(learner.meta_loss)(params, sample([0, 1, 2, 3, 4], 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = meta_batch(learner.evaluate)(params, test)[1]["accuracy"].item()
    print(f'held-out accuracy before {before:.3f} after {after:.3f}')
    assert after > 0.8 and after > before + 0.1


def test_missing_class_in_support_is_a_clear_error():
    encoder, params = functionalize(torch_encoder())
    tasks = few_shot_tasks()
    bad = Task(tasks.support_x, tasks.support_y.clone().masked_fill(tasks.support_y == 1, 0), *tasks[2:])
    with pytest.raises(ValueError, match=r"protonet: the support set of task 0 has no example of class 1"):
        meta_batch(protonet(encoder).meta_loss)(params, bad)


def test_ways_that_do_not_match_the_labels_is_a_clear_error():
    encoder, params = functionalize(torch_encoder())
    tasks = few_shot_tasks(ways=3)
    with pytest.raises(ValueError, match=r"protonet: the labels go up to 2 but ways=2"):
        meta_batch(protonet(encoder, ways=2).meta_loss)(params, tasks)
    with pytest.raises(ValueError, match=r"has no example of class 3 \(ways=4\)"):
        meta_batch(protonet(encoder, ways=4).meta_loss)(params, tasks)
    with pytest.raises(ValueError, match=r"protonet: ways must be >= 2 \(got 1\)"):
        protonet(encoder, ways=1)


def test_encoder_output_not_2d_is_a_clear_error():
    encoder, params = functionalize(nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (2, 2))))
    with pytest.raises(ValueError, match=r"protonet: the encoder must return features of shape \(examples, features\) "
                                         r"\(got shape \(2, 2, 2\)"):
        meta_batch(protonet(encoder).meta_loss)(params, few_shot_tasks())


def test_float_labels_and_modules_are_refused():
    encoder, params = functionalize(torch_encoder())
    tasks = few_shot_tasks()
    with pytest.raises(TypeError, match=r"protonet: task.support_y must hold one integer class label"):
        meta_batch(protonet(encoder).meta_loss)(params, Task(tasks.support_x, tasks.support_y.float(), *tasks[2:]))
    with pytest.raises(TypeError, match=r"protonet: model must be a pure function"):
        protonet(torch_encoder())
