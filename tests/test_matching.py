"""Matching Networks (with and without full context embeddings): exact against a hand-written autograd loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_protonet import few_shot_tasks, leaves, meta_gradient, torch_encoder
from torch import nn
from torch.func import functional_call

from metafunc import Task, convert_norm_layers, functionalize, matching_net, meta_batch
from metafunc.algorithms.matching import FCE_PREFIX, LOG_TEMPERATURE_KEY
from metafunc.core.tree import tree_relative_error


def _cell(p: dict, prefix: str, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
    """An LSTM cell written gate by gate (input, forget, cell, output)."""
    w_ih, w_hh, b = p[prefix + "weight_ih"], p[prefix + "weight_hh"], p[prefix + "bias"]
    d = w_ih.shape[0] // 4
    pre = [x @ w_ih[j * d:(j + 1) * d].T + h @ w_hh[j * d:(j + 1) * d].T + b[j * d:(j + 1) * d] for j in range(4)]
    c_new = torch.sigmoid(pre[1]) * c + torch.sigmoid(pre[0]) * torch.tanh(pre[2])
    return torch.sigmoid(pre[3]) * torch.tanh(c_new), c_new


def reference_similarity(fq, gs, distance):
    """Cosines by F.cosine_similarity; squared distances by the expansion |q|^2 - 2 q.s + |s|^2."""
    if distance == "cosine":
        return F.cosine_similarity(fq.unsqueeze(1), gs.unsqueeze(0), dim=-1)
    return -((fq ** 2).sum(1, keepdim=True) - 2 * fq @ gs.T + (gs ** 2).sum(1))


def reference_matching_loss(module, params, tasks, ways, temperature=1.0, fce_steps=0, distance="cosine"):
    """``temperature``: a number, or ``None`` for the learned one, ``exp(params[LOG_TEMPERATURE_KEY])``."""
    if temperature is None:
        temperature = torch.exp(params[LOG_TEMPERATURE_KEY])
    total = 0.0
    for i in range(tasks.num_tasks):
        xs, ys, xq, yq = tasks.task_at(i)
        weights = {k: v for k, v in params.items() if not k.startswith(FCE_PREFIX) and k != LOG_TEMPERATURE_KEY}
        gs, fq = functional_call(module, weights, (xs,)), functional_call(module, weights, (xq,))
        if fce_steps:
            d = gs.shape[1]
            fwd, bwd = [], [None] * len(gs)
            h = c = torch.zeros(d)
            for j in range(len(gs)):
                h, c = _cell(params, FCE_PREFIX + "g_fwd.", gs[j], h, c)
                fwd.append(h)
            h = c = torch.zeros(d)
            for j in reversed(range(len(gs))):
                h, c = _cell(params, FCE_PREFIX + "g_bwd.", gs[j], h, c)
                bwd[j] = h
            gs = gs + torch.stack(fwd) + torch.stack(bwd)
            outs = []
            for z in fq:
                h = r = c = torch.zeros(d)
                for _ in range(fce_steps):
                    h_hat, c = _cell(params, FCE_PREFIX + "f.", z, torch.cat([h, r]), c)
                    h = h_hat + z
                    a = torch.softmax(gs @ h, 0)
                    r = (a.unsqueeze(1) * gs).sum(0)
                outs.append(h)
            fq = torch.stack(outs)
        attention = torch.softmax(reference_similarity(fq, gs, distance) / temperature, dim=1)
        probs = torch.stack([attention[:, ys == k].sum(1) for k in range(ways)], dim=1)
        total = total - torch.log(probs[torch.arange(len(yq)), yq]).mean()
    return total / tasks.num_tasks


@pytest.mark.parametrize("fce", [False, True], ids=["plain", "fce"])
@pytest.mark.parametrize("mode,chunk", [("vmap", None), ("vmap", 2), ("loop", None)])
def test_meta_gradient_equals_autograd_reference(float64, fce, mode, chunk):
    module = torch_encoder()
    encoder, params = functionalize(convert_norm_layers(module))
    learner = matching_net(encoder, temperature=0.5, fce=fce, feature_dim=4, fce_steps=2)
    params = learner.init(params)
    if fce:
        assert sorted(k for k in params if k.startswith(FCE_PREFIX))[0] == "fce/f.bias"
    tasks = few_shot_tasks()
    loss, metrics, grads = meta_gradient(learner, params, tasks, mode=mode, chunk_size=chunk)
    ref_params = leaves(params)
    ref_loss = reference_matching_loss(module, ref_params, tasks, 3, temperature=0.5, fce_steps=2 if fce else 0)
    ref = dict(zip(ref_params, torch.autograd.grad(ref_loss, list(ref_params.values()))))
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert tree_relative_error(grads, ref) < 1e-10


def bn_encoder() -> nn.Module:
    """A tiny encoder with torch's BatchNorm (batch statistics: support and query sets are normalised apart)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 4))


@pytest.mark.parametrize("distance,learn,fce", [("cosine", True, False), ("squared_euclidean", False, False),
                                                ("squared_euclidean", True, True)],
                         ids=["cosine-learned_t", "squared_euclidean", "squared_euclidean-learned_t-fce"])
@pytest.mark.parametrize("mode,chunk", [("vmap", None), ("vmap", 2), ("loop", None)])
def test_distances_and_learned_temperature_equal_autograd_reference_with_batchnorm(float64, distance, learn, fce,
                                                                                   mode, chunk):
    module = bn_encoder()
    encoder, params = functionalize(convert_norm_layers(bn_encoder()))
    learner = matching_net(encoder, temperature=0.5, distance=distance, learn_temperature=learn, fce=fce,
                           feature_dim=4)
    params = learner.init(params)
    assert (LOG_TEMPERATURE_KEY in params) == learn
    if learn:
        assert params[LOG_TEMPERATURE_KEY].shape == () and params[LOG_TEMPERATURE_KEY].item() == math.log(0.5)
    tasks = few_shot_tasks()
    loss, _, grads = meta_gradient(learner, params, tasks, mode=mode, chunk_size=chunk)
    ref_params = leaves(params)
    ref_loss = reference_matching_loss(module, ref_params, tasks, 3, temperature=None if learn else 0.5,
                                       fce_steps=2 if fce else 0, distance=distance)
    ref = dict(zip(ref_params, torch.autograd.grad(ref_loss, list(ref_params.values()))))
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert tree_relative_error(grads, ref) < 1e-10
    if learn:
        assert abs(grads[LOG_TEMPERATURE_KEY].item()) > 1e-6  # the outer optimizer moves the temperature


@pytest.mark.parametrize("distance", ["cosine", "squared_euclidean"])
def test_each_distance_gives_the_hand_written_attention(float64, distance):
    """predict's log-probabilities from similarities written entry by entry, softmax and class sums by hand."""
    encoder, params = functionalize(nn.Linear(3, 4))
    task = few_shot_tasks(num_tasks=1).task_at(0)
    learner = matching_net(encoder, temperature=0.25, distance=distance)
    out = learner.predict(learner.adapt(params, task.support_x, task.support_y)[0], task.query_x)
    gs, fq = encoder(params, task.support_x), encoder(params, task.query_x)
    expected = torch.empty(len(fq), 3)
    for i, q in enumerate(fq):
        sims = []
        for s in gs:
            sim = (q @ s) / (q.norm() * s.norm()) if distance == "cosine" else -sum((a - b) ** 2 for a, b in zip(q, s))
            sims.append(torch.exp(sim / 0.25))
        total = sum(sims)
        for k in range(3):
            expected[i, k] = torch.log(sum(w for w, y in zip(sims, task.support_y) if y == k) / total)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-13)  # atol: log(ratio near 1) in the reference


def test_far_classes_give_finite_log_probabilities(float64):
    """Squared distances of 100 and 8100: exp(-8000) underflows, log(softmax @ onehot) would be -inf."""
    encoder, params = functionalize(nn.Linear(2, 2, bias=False))
    params = {"weight": torch.eye(2)}
    learner = matching_net(encoder, distance="squared_euclidean")
    task_params, _ = learner.adapt(params, torch.tensor([[0.0, 0.0], [100.0, 0.0]]), torch.tensor([0, 1]))
    out = learner.predict(task_params, torch.tensor([[10.0, 0.0]]))
    assert torch.equal(out, torch.tensor([[0.0, -8000.0]]))


def test_adapt_and_predict_match_the_meta_loss(float64):
    encoder, params = functionalize(convert_norm_layers(torch_encoder()))
    learner = matching_net(encoder, fce=True, feature_dim=4)
    params = learner.init(params)
    task = few_shot_tasks(num_tasks=1).task_at(0)
    task_params, _ = learner.adapt(params, task.support_x, task.support_y)
    log_probs = learner.predict(task_params, task.query_x)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(len(task.query_y)), atol=1e-12)
    loss, _ = learner.meta_loss(params, task)
    assert torch.allclose(F.nll_loss(log_probs, task.query_y), loss, rtol=1e-12)


def test_fce_needs_feature_dim_and_init():
    encoder, params = functionalize(torch_encoder())
    with pytest.raises(ValueError, match=r"matching_net: fce=True needs feature_dim="):
        matching_net(encoder, fce=True)
    with pytest.raises(ValueError, match=r"matching_net: the meta-parameters lack the full-context-embedding "
                                         r"parameters .*learner.init\(params\)"):
        meta_batch(matching_net(encoder, fce=True, feature_dim=4).meta_loss)(params, few_shot_tasks())
    with pytest.raises(ValueError, match=r"matching_net: temperature must be > 0 \(got 0\)"):
        matching_net(encoder, temperature=0)
    with pytest.raises(ValueError, match=r"^matching_net: distance must be one of 'cosine', 'squared_euclidean' "
                                         r"\(got 'euclidean'\)"):
        matching_net(encoder, distance="euclidean")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^matching_net: learn_temperature must be a bool \(got 'yes'\)"):
        matching_net(encoder, learn_temperature="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^matching_net: learn_temperature=True but the meta-parameters lack "
                                         r"'matching/log_temperature'; build them with learner.init\(params\)"):
        meta_batch(matching_net(encoder, learn_temperature=True).meta_loss)(params, few_shot_tasks())


def test_bad_tasks_are_clear_errors():
    encoder, params = functionalize(torch_encoder())
    tasks = few_shot_tasks()
    missing = Task(tasks.support_x, tasks.support_y.clamp(max=1), *tasks[2:])
    with pytest.raises(ValueError, match=r"matching_net: the support set of task 0 has no example of class 2"):
        meta_batch(matching_net(encoder, ways=3).meta_loss)(params, missing)
    with pytest.raises(ValueError, match=r"matching_net: task 0 has query label 2 .*not one of its support classes "
                                         r"0..1 \(ways=2\)"):  # the number of ways comes from the support set
        meta_batch(matching_net(encoder).meta_loss)(params, missing)
    with pytest.raises(ValueError, match=r"matching_net: the labels go up to 2 but ways=2"):
        meta_batch(matching_net(encoder, ways=2).meta_loss)(params, tasks)
    flat, flat_params = functionalize(nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (2, 2))))
    with pytest.raises(ValueError, match=r"matching_net: the encoder must return features of shape"):
        meta_batch(matching_net(flat).meta_loss)(flat_params, tasks)
