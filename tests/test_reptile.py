"""Reptile's inner loop at the paper's settings (Adam with beta1 = 0, inner mini-batches): exact against plain torch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metafunc import LEARNERS, Task, convert_norm_layers, functionalize, meta_batch, reptile
from metafunc.core.tree import tree_relative_error


def bn_classifier() -> nn.Module:
    """A tiny classifier with torch's BatchNorm (batch statistics), which the reference runs on as is. The norm comes
    after the nonlinearity: a bias right before BatchNorm has a gradient of exactly 0 in theory, rounding noise in
    practice, which Adam's normalisation would turn into an arbitrary step."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 3))


def tasks(num_tasks: int = 3, support: int = 7, queries: int = 4) -> Task:
    g = torch.Generator().manual_seed(1)
    return Task(torch.randn(num_tasks, support, 3, generator=g), torch.randint(0, 3, (num_tasks, support), generator=g),
                torch.randn(num_tasks, queries, 3, generator=g), torch.randint(0, 3, (num_tasks, queries), generator=g))


def reference_adam_adapt(module, params, x, y, *, lr, steps, batch):
    """Adam with beta1 = 0 written out: m_t = g_t (no first-moment average, no correction), v_t = 0.999 v + 0.001 g^2,
    p -= lr m_t / (sqrt(v_t / (1 - 0.999^t)) + 1e-8); step t takes support rows (t-1)*batch ... modulo the size."""
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    v = {k: torch.zeros_like(t) for k, t in p.items()}
    n = x.shape[0]
    for t in range(1, steps + 1):
        rows = [((t - 1) * batch + j) % n for j in range(batch)]
        loss = F.cross_entropy(functional_call(module, p, (x[rows],)), y[rows])
        grads = torch.autograd.grad(loss, list(p.values()))
        new = {}
        for (k, value), g in zip(p.items(), grads):
            v[k] = 0.999 * v[k] + 0.001 * g ** 2
            new[k] = (value - lr * g / (torch.sqrt(v[k] / (1 - 0.999 ** t)) + 1e-8)).detach().requires_grad_(True)
        p = new
    return {k: t.detach() for k, t in p.items()}


@pytest.mark.parametrize("mode,chunk", [("vmap", None), ("vmap", 2), ("loop", None)])
def test_adam_minibatch_meta_gradient_equals_a_hand_written_adam_loop(float64, mode, chunk):
    module = bn_classifier()
    model, params = functionalize(convert_norm_layers(copy.deepcopy(module)))
    learner = reptile(model, inner_lr=0.01, steps=5, inner_optimizer="adam", inner_batch_size=3)
    batch = tasks()
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss, _ = meta_batch(learner.meta_loss, mode=mode, chunk_size=chunk)(leaves, batch)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    phis = [reference_adam_adapt(module, params, batch.support_x[i], batch.support_y[i], lr=0.01, steps=5, batch=3)
            for i in range(batch.num_tasks)]
    expected = {k: params[k].detach() - torch.stack([phi[k] for phi in phis]).mean(0) for k in params}
    assert tree_relative_error(grads, expected) < 1e-10
    phi, support_losses = learner.adapt(params, batch.support_x[0], batch.support_y[0])
    assert tree_relative_error(phi, phis[0]) < 1e-12 and support_losses.shape == (5,)
    assert all((phi[k] - params[k]).abs().max() > 1e-3 for k in params)  # every parameter moved


def test_adam_full_batch_equals_torch_optim_adam_with_beta1_zero(float64):
    module = bn_classifier()
    model, params = functionalize(convert_norm_layers(copy.deepcopy(module)))
    x, y = tasks(num_tasks=1).task_at(0)[:2]
    phi, _ = reptile(model, inner_lr=0.05, steps=4, inner_optimizer="adam").adapt(params, x, y)
    twin = copy.deepcopy(module)
    optimizer = torch.optim.Adam(twin.parameters(), lr=0.05, betas=(0.0, 0.999), eps=1e-8)
    for _ in range(4):
        optimizer.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        optimizer.step()
    assert tree_relative_error(phi, dict(twin.named_parameters())) < 1e-12


def test_minibatches_walk_the_support_set_in_its_order_and_wrap_around(float64):
    """One-hot inputs, loss -mean(w . x), SGD at lr 1: w[i] counts how often example i was in a batch, over b."""
    model, params = functionalize(nn.Linear(5, 1, bias=False))
    params = {"weight": torch.zeros(1, 5)}
    x, y = torch.eye(5), torch.zeros(5, 1)

    def used(steps: int, batch: int | None, vmapped: bool = False) -> list[float]:
        learner = reptile(model, inner_lr=1.0, steps=steps, loss=lambda out, _: -out.mean(), inner_batch_size=batch)
        size = 5 if batch is None else min(batch, 5)  # a batch above the support size is the whole support set
        if vmapped:
            phi = torch.func.vmap(lambda xs, ys: learner.adapt(params, xs, ys)[0])(x[None], y[None])
            return (phi["weight"][0, 0] * size).tolist()
        return (learner.adapt(params, x, y)[0]["weight"][0] * size).tolist()

    assert used(3, 2) == [2.0, 1.0, 1.0, 1.0, 1.0]  # batches [0, 1], [2, 3], [4, 0]
    assert used(5, 2) == [2.0] * 5                   # ... [1, 2], [3, 4]: every example twice
    assert used(3, 2, vmapped=True) == [2.0, 1.0, 1.0, 1.0, 1.0]
    assert used(2, 4) == [2.0, 2.0, 2.0, 1.0, 1.0]  # [0, 1, 2, 3], [4, 0, 1, 2]
    assert used(2, None) == used(2, 5) == used(2, 9) == [2.0] * 5  # the whole support set each step


def test_eval_batch_size_changes_only_evaluate(float64):
    model, params = functionalize(convert_norm_layers(bn_classifier()))
    batch = tasks()
    minibatch = reptile(model, inner_lr=0.01, steps=3, inner_optimizer="adam", inner_batch_size=3)
    mixed = reptile(model, inner_lr=0.01, steps=3, inner_optimizer="adam", inner_batch_size=3, eval_batch_size=7)
    full = reptile(model, inner_lr=0.01, steps=3, inner_optimizer="adam")
    assert torch.equal(meta_batch(mixed.meta_loss)(params, batch)[0], meta_batch(minibatch.meta_loss)(params, batch)[0])
    assert torch.equal(meta_batch(mixed.evaluate)(params, batch)[0], meta_batch(full.evaluate)(params, batch)[0])
    assert not torch.equal(meta_batch(minibatch.evaluate)(params, batch)[0], meta_batch(full.evaluate)(params, batch)[0])


def test_default_inner_loop_is_plain_sgd_on_the_whole_support_set(float64):
    module = bn_classifier()
    model, params = functionalize(convert_norm_layers(copy.deepcopy(module)))
    x, y = tasks(num_tasks=1).task_at(0)[:2]
    phi, _ = reptile(model, inner_lr=0.1, steps=2).adapt(params, x, y)
    twin = copy.deepcopy(module)
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        optimizer.step()
    assert tree_relative_error(phi, dict(twin.named_parameters())) < 1e-12


def test_bad_inner_options_are_clear_errors():
    model, _ = functionalize(bn_classifier())
    with pytest.raises(ValueError, match=r"^reptile: inner_optimizer must be one of 'sgd', 'adam' \(got 'rmsprop'\)"):
        reptile(model, inner_optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^reptile: inner_batch_size must be >= 1 \(got 0\)"):
        reptile(model, inner_batch_size=0)
    with pytest.raises(TypeError, match=r"^reptile: eval_batch_size must be an int \(got float 2.5\)"):
        reptile(model, eval_batch_size=2.5)  # type: ignore[arg-type]


def test_the_paper_settings_are_cli_flags():
    from metafunc.cli import build_parser
    from metafunc.cli.options import learner_options_from_args

    options = {o.name: o for o in LEARNERS["reptile"].options}
    assert options["inner_optimizer"].choices == ("sgd", "adam") and options["inner_optimizer"].default == "sgd"
    assert options["inner_batch_size"].kind is int and options["inner_batch_size"].optional
    args = build_parser().parse_args(["train", "--algorithm", "reptile", "--inner-optimizer", "adam",
                                      "--inner-batch-size", "5", "--eval-batch-size", "5"])
    assert learner_options_from_args(args) == {"inner_optimizer": "adam", "inner_batch_size": 5, "eval_batch_size": 5}
