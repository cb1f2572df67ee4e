"""One contract every learner in ``tests/learner_cases.py`` passes (add a case there, not a test here)."""

from __future__ import annotations

import pytest
import torch
from learner_cases import CASES, LearnerCase

from metafunc import meta_batch, meta_value_and_grad
from metafunc.core.tree import tree_relative_error
from metafunc.step.default import resolve_workers


def _meta_gradient(learner, params, tasks, **meta_batch_kwargs):
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss, metrics = meta_batch(learner.meta_loss, **meta_batch_kwargs)(params, tasks)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    tree = {k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(params.items(), grads)}
    return loss.detach(), metrics, tree


cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


@cases
def test_meta_gradient_tree_matches_params_tree(case: LearnerCase):
    learner, params, _ = case.build()
    _, _, tree = _meta_gradient(learner, params, case.tasks(2), mode="loop")
    assert isinstance(tree, dict) and list(tree) == list(params)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    meta_batch(learner.meta_loss, mode="loop")(leaves, case.tasks(2))[0].backward()
    for name, p in leaves.items():
        assert p.grad is not None, f"{name} got no gradient from .backward()"
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype, name
        assert torch.equal(p.grad, tree[name]), name
    assert sum(float(g.abs().sum()) for g in tree.values()) > 0


@cases
def test_vmap_equals_loop(case: LearnerCase):
    learner, params, _ = case.build(dtype=torch.float64)
    tasks = case.tasks(3, dtype=torch.float64)
    loss_l, metrics_l, grads_l = _meta_gradient(learner, params, tasks, mode="loop")
    for chunk_size in (None, 2):
        loss_v, metrics_v, grads_v = _meta_gradient(learner, params, tasks, mode="vmap", chunk_size=chunk_size)
        assert torch.allclose(loss_v, loss_l, rtol=1e-12, atol=0), chunk_size
        assert metrics_v.keys() == metrics_l.keys()
        for k in metrics_v:
            assert torch.allclose(metrics_v[k], metrics_l[k], rtol=1e-12, atol=1e-14), (k, chunk_size)
        assert tree_relative_error(grads_v, grads_l) < 1e-10, chunk_size


@cases
def test_default_fast_meta_step_with_tasks_on_threads_equals_the_loop(case: LearnerCase):
    learner, params, _ = case.build(dtype=torch.float64)
    tasks = case.tasks(3, dtype=torch.float64)
    loss_l, metrics_l, grads_l = _meta_gradient(learner, params, tasks, mode="loop")
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss, metrics, grads = meta_value_and_grad(learner.meta_loss, workers=2)(leaves, tasks)
    assert resolve_workers(learner.meta_loss, tasks, mode="loop", workers=2) == 2
    assert torch.allclose(loss, loss_l, rtol=1e-12, atol=0)
    assert metrics.keys() == metrics_l.keys()
    assert tree_relative_error(grads, grads_l) < 1e-10


@cases
def test_reduce_none_keeps_one_value_per_task_and_sum_adds_them(case: LearnerCase):
    learner, params, _ = case.build(dtype=torch.float64)
    tasks = case.tasks(3, dtype=torch.float64)
    per_task, metrics = meta_batch(learner.meta_loss, mode="vmap", reduce="none")(params, tasks)
    total, total_metrics = meta_batch(learner.meta_loss, mode="loop", reduce="sum")(params, tasks)
    assert per_task.shape == (3,) and metrics["loss"].shape == (3,)
    assert torch.allclose(per_task.sum(), total, rtol=1e-12)
    assert torch.allclose(metrics["loss"].sum(), total_metrics["loss"], rtol=1e-12)


@cases
def test_meta_batch_of_one_equals_the_per_task_function(case: LearnerCase):
    learner, params, _ = case.build(dtype=torch.float64)
    tasks = case.tasks(1, dtype=torch.float64)
    loss, _, grads = _meta_gradient(learner, params, tasks, mode="vmap")
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    single, _ = learner.meta_loss(leaves, tasks.task_at(0))
    single_grads = torch.autograd.grad(single, list(leaves.values()), allow_unused=True)
    single_tree = {k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(leaves.items(), single_grads)}
    assert torch.allclose(loss, single.detach(), rtol=1e-12)
    assert tree_relative_error(grads, single_tree) < 1e-10


@cases
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_finite_loss_and_dtype_preserved(case: LearnerCase, dtype):
    learner, params, _ = case.build(dtype=dtype)
    assert all(p.dtype == dtype for p in params.values())
    loss, metrics, grads = _meta_gradient(learner, params, case.tasks(2, dtype=dtype), mode="vmap")
    assert loss.dim() == 0 and torch.isfinite(loss) and "loss" in metrics
    assert all(v.dim() == 0 and torch.isfinite(v) for v in metrics.values())
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert loss.dtype == dtype
    assert all(m.dtype == dtype for m in metrics.values())
    assert all(g.dtype == dtype for g in grads.values())
    task_params, support_losses = learner.adapt(params, *case.tasks(1, dtype=dtype).task_at(0)[:2])
    assert all(v.dtype == dtype for v in task_params.values()) and support_losses.dtype == dtype


@cases
def test_same_seed_same_result_and_another_seed_differs(case: LearnerCase):
    results = []
    for seed in (0, 0, 1):
        learner, params, _ = case.build(seed=seed)
        results.append(_meta_gradient(learner, params, case.tasks(2, seed=seed), mode="vmap"))
    (loss_a, _, grads_a), (loss_b, _, grads_b), (loss_c, _, grads_c) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert not torch.equal(loss_a, loss_c)


@cases
def test_evaluate_reports_query_loss_without_graph(case: LearnerCase):
    learner, params, _ = case.build(dtype=torch.float64)
    tasks = case.tasks(2, dtype=torch.float64)
    loss, metrics = meta_batch(learner.evaluate, mode="vmap")(params, tasks)
    _, train_metrics = meta_batch(learner.meta_loss, mode="loop")(params, tasks)
    assert not loss.requires_grad
    assert torch.allclose(loss, train_metrics["loss"], rtol=1e-12)


GRADIENT_FAMILY = ("maml", "fomaml", "anil", "boil", "meta_sgd", "reptile")
GRADIENT_CASES = [c for c in CASES if c.id.split("-")[0] in GRADIENT_FAMILY]


@pytest.mark.parametrize("case", GRADIENT_CASES, ids=[c.id for c in GRADIENT_CASES])
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_evaluate_after_zero_steps_scores_the_initial_parameters(case: LearnerCase, mode):
    """evaluate(steps=0) (the 'MSE after 0 steps' row) is the query loss of the initial parameters."""
    from metafunc import with_steps

    learner, params, _ = case.build(dtype=torch.float64)
    tasks = case.tasks(2, dtype=torch.float64)
    zero, metrics = meta_batch(with_steps(learner.evaluate, 0), mode=mode)(params, tasks)
    assert torch.isfinite(zero) and all(torch.isfinite(v) for v in metrics.values())
    predictions = torch.stack([learner.predict(params, tasks.query_x[i]) for i in range(2)])
    loss_fn = torch.nn.functional.mse_loss if tasks.query_y.is_floating_point() else torch.nn.functional.cross_entropy
    expected = torch.stack([loss_fn(predictions[i], tasks.query_y[i]) for i in range(2)]).mean()
    assert torch.allclose(zero, expected, rtol=1e-12)
    with pytest.raises(ValueError, match=r"^with_steps: steps must be >= 0 \(got -1\)"):
        with_steps(learner.evaluate, -1)
