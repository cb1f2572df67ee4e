"""One per-task return convention: a per-task function may return a loss tensor or ``(loss, metrics)``; it is
normalised once, where it enters (``per_task_function``), and every batching and step sees ``(loss, metrics)``."""

from __future__ import annotations

import pytest
import torch

from metafunc import TaskFunction, functionalize, maml, meta_batch, meta_value_and_grad, models, sinusoid_tasks
from metafunc.core.task_function import per_task_function


def _setup():
    torch.manual_seed(0)
    model, params = functionalize(models.mlp(1, (8,), 1, norm="layer"))
    learner = maml(model, inner_lr=0.1, steps=2, loss="mse")
    tasks = sinusoid_tasks(3, shots=4, generator=torch.Generator().manual_seed(0)).to(torch.get_default_dtype())
    return learner, params, tasks


def _reference(learner, params, tasks):
    """The mean query loss over the tasks and its gradient, by plain autograd over one task at a time."""
    losses = [learner.meta_loss(params, tasks.task_at(i))[0] for i in range(tasks.num_tasks)]
    mean = torch.stack(losses).mean()
    grads = torch.autograd.grad(mean, list(params.values()))
    return mean.detach(), dict(zip(params, grads))


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_a_loss_tensor_and_a_loss_with_metrics_give_the_same_results(float64, mode):
    learner, params, tasks = _setup()
    ref_loss, ref_grads = _reference(learner, params, tasks)

    def loss_only(p, task):
        return learner.meta_loss(p, task)[0]

    for per_task, metric_names in ((learner.meta_loss, {"loss", "support_loss"}), (loss_only, set())):
        loss, metrics = meta_batch(per_task, mode=mode)(params, tasks)
        assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=0) and set(metrics) == metric_names
        step_loss, step_metrics, grads = meta_value_and_grad(per_task, mode=mode)(params, tasks)
        assert torch.allclose(step_loss, ref_loss, rtol=1e-12, atol=0) and set(step_metrics) == metric_names
        for name in params:
            assert torch.allclose(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12), name
        if metric_names:
            assert torch.allclose(step_metrics["loss"], ref_loss, rtol=1e-12, atol=0)


def test_the_convention_is_applied_once_and_keeps_the_checks():
    learner, params, tasks = _setup()
    normalised = per_task_function(learner, "meta_batch")
    assert isinstance(normalised, TaskFunction)
    assert normalised.validate is learner.validate and normalised.thread_safe is learner.meta_loss.thread_safe
    assert per_task_function(normalised, "meta_batch") is normalised  # not wrapped twice
    plain = per_task_function(lambda p, t: t.query_y.sum(), "meta_batch")
    assert plain.validate is None and not plain.thread_safe()
    loss, metrics = plain(params, tasks.task_at(0))
    assert metrics == {} and torch.equal(loss, tasks.query_y[0].sum())
