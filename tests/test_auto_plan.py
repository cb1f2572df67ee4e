"""``mode="auto"`` chooses by measuring (issue 23): the candidates it tries, the choice it keeps, the candidates it
skips instead of failing, and the gradients it returns while it measures (equal to a fixed plan's and to the plain
autograd reference). Which candidate is fastest is a benchmark's claim (benchmarks/auto_plan.py), never a test's."""

from __future__ import annotations

import pytest
import torch
from reference import reference_meta_gradient, relative_error, torch_conv4
from torch import nn

import metafunc as mf
from metafunc.step.plan import AUTO_CONFIRM, AUTO_TIE, AUTO_TRIALS, AutoPlanner, StepPlan, candidate_plans, plan_key

f64 = torch.float64


def _sinusoid_case(num_tasks: int = 6):
    torch.manual_seed(0)
    model, params = mf.functionalize(mf.models.mlp().to(f64))
    tasks = mf.sinusoid_tasks(num_tasks, shots=5, generator=torch.Generator().manual_seed(1)).to(f64)
    return mf.maml(model, inner_lr=0.01, loss="mse"), params, tasks


def test_auto_times_every_candidate_then_keeps_the_fastest_and_every_call_is_the_exact_gradient():
    learner, params, tasks = _sinusoid_case()
    _, _, want = mf.meta_value_and_grad(learner, mode="loop", workers=1)(params, tasks)
    step = mf.meta_value_and_grad(learner)
    step(params, tasks)
    candidates = step.planner.report()["candidates"]
    # on this CPU: the loop with two tasks at once (the old default) first, one at a time, vmap over all and halves
    assert candidates[:2] == ["loop, 2 tasks at once", "loop"] or candidates[0] == "loop"
    assert {"vmap", "vmap, chunks of 3"} <= set(candidates)
    plans = [str(step.plan)]
    for _ in range((AUTO_TRIALS + AUTO_CONFIRM) * len(candidates) + 2):   # a close race is timed more
        _, _, grads = step(params, tasks)
        plans.append(str(step.plan))
        assert relative_error(grads, want) < 1e-12, step.plan          # every plan: the same meta-gradient
    assert sorted(plans[:AUTO_TRIALS * len(candidates)]) == sorted(candidates * AUTO_TRIALS)  # each measured
    report = step.planner.report()
    chosen, best = report["chosen"], min(report["seconds"].values())
    assert report["seconds"][chosen] <= (1 + AUTO_TIE) * best and report["skipped"] == {}   # the fastest, or a tie
    assert set(plans[-3:]) == {chosen}                                     # then kept


def test_a_new_signature_is_measured_again_and_a_fixed_mode_is_never_measured():
    learner, params, tasks = _sinusoid_case()
    step = mf.meta_value_and_grad(learner)
    for _ in range(2 * AUTO_TRIALS * 6):
        step(params, tasks)
    fewer = mf.Task(*(t[:3] for t in tasks))
    step(params, fewer)
    assert step.planner.plan(plan_key(params, fewer)) is None     # still measuring the new shape
    fixed = mf.meta_value_and_grad(learner, mode="vmap", chunk_size=2)
    fixed(params, tasks)
    assert fixed.plan == StepPlan("vmap", 2) and fixed.planner.plan() is None
    assert candidate_plans(learner, params, tasks, workers=3) == [StepPlan("loop", workers=3)]
    assert candidate_plans(learner, params, mf.Task(*(t[:1] for t in tasks))) == [StepPlan("loop")]


class _LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 8, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_a_model_without_a_batching_rule_runs_in_the_loop_and_the_skipped_vmap_says_why():
    torch.manual_seed(0)
    model, params = mf.functionalize(_LSTMClassifier())
    learner = mf.maml(model, inner_lr=0.1)
    labels = torch.arange(4).repeat(4, 2)
    tasks = mf.Task(torch.randn(4, 8, 5, 3), labels, torch.randn(4, 8, 5, 3), labels)
    with pytest.raises(RuntimeError, match="Batching rule not implemented for aten::lstm"):
        mf.meta_value_and_grad(learner, mode="vmap")(params, tasks)
    step = mf.meta_value_and_grad(learner)
    _, _, want = mf.meta_value_and_grad(learner, mode="loop", workers=1)(params, tasks)
    for _ in range(6):
        _, _, grads = step(params, tasks)
        assert step.plan.mode == "loop" and relative_error(grads, want) < 1e-5
    report = step.planner.report()
    assert set(report["skipped"]) == {"vmap", "vmap, chunks of 2"}
    assert all("Batching rule not implemented for aten::lstm" in why for why in report["skipped"].values())


def test_torch_norm_layers_at_second_order_never_run_under_vmap_and_auto_equals_the_autograd_reference():
    """torch 2.13's fused batch_norm gives wrong second-order gradients under vmap: auto leaves vmap out of the
    candidates for such a model (it used to refuse the model) and its meta-gradient is the reference's."""
    torch.manual_seed(0)
    module = torch_conv4(3, width=4, image_size=16).to(f64)
    model, params = mf.functionalize(module)
    learner = mf.maml(model, inner_lr=0.3, steps=2)
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat(3, 2)
    tasks = mf.Task(torch.randn(3, 6, 1, 16, 16, generator=g, dtype=f64), labels,
                    torch.randn(3, 6, 1, 16, 16, generator=g, dtype=f64), labels)
    assert all(p.mode == "loop" for p in candidate_plans(learner, params, tasks, loop_workers=2))
    want = reference_meta_gradient(module, params, tasks, algorithm="maml", inner_lr=0.3, steps=2,
                                   loss="cross_entropy")
    step = mf.meta_value_and_grad(learner)
    for _ in range(2 * AUTO_TRIALS):
        _, _, grads = step(params, tasks)
        assert relative_error(grads, want) < 1e-10
    with pytest.raises(ValueError, match=r"maml: the model has torch norm layers .* mode='loop'"):
        mf.meta_value_and_grad(learner, mode="vmap")(params, tasks)   # forcing vmap is still refused
    loss, _ = mf.meta_batch(learner)(params, tasks)                     # and meta_batch's auto takes the loop
    assert torch.isfinite(loss)


def test_out_of_memory_drops_that_chunk_and_the_larger_ones_and_any_other_error_every_vmap():
    planner = AutoPlanner()
    calls = []

    def run(plan: StepPlan) -> str:
        calls.append(str(plan))
        if plan.mode == "vmap" and (plan.chunk_size or 8) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return str(plan)

    candidates = [StepPlan("vmap"), StepPlan("vmap", 4), StepPlan("vmap", 2), StepPlan("loop")]
    assert planner.run("k", lambda: candidates, run) == ("vmap, chunks of 2", StepPlan("vmap", 2))
    assert calls == ["vmap", "vmap, chunks of 4", "vmap, chunks of 2"]
    assert set(planner.report("k")["skipped"]) == {"vmap", "vmap, chunks of 4"}

    def no_rule(plan: StepPlan) -> str:
        if plan.mode == "vmap":
            raise RuntimeError("vmap: It looks like you're attempting to use a Tensor in some data-dependent control flow")
        return str(plan)

    other = AutoPlanner()
    assert other.run("k", lambda: candidates, no_rule) == ("loop", StepPlan("loop"))
    assert set(other.report("k")["skipped"]) == {"vmap", "vmap, chunks of 4", "vmap, chunks of 2"}

    def broken(plan: StepPlan) -> str:
        raise ValueError("maml: task.query_y has labels in [3, ...]")

    with pytest.raises(ValueError, match="labels in"):   # the loop's error is the user's to see
        AutoPlanner().run("k", lambda: [StepPlan("loop"), StepPlan("vmap")], broken)
