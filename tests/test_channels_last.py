"""The channels-last loop (issue 23): each task's images and convolution weights handed to the per-task function in
channels-last memory format, the layout torch's CPU pooling and BatchNorm kernels are fast on. Same values, so the
meta-gradient must equal the plain ``torch.autograd`` reference in float64 on every norm layer, come back in the
parameters' own layout, and ``mode="auto"`` must try it for images, skip it where a model cannot take the layout, and
settle a tie for the plan holding fewer tasks. Which plan is faster is a benchmark's claim (benchmarks/peers.py)."""

from __future__ import annotations

import pytest
import torch
from reference import reference_meta_gradient, relative_error, torch_conv4
from torch import nn

import metafunc as mf
from metafunc.step import plan as planning
from metafunc.step.plan import (
    AUTO_CONFIRM,
    AUTO_TIE,
    AUTO_TRIALS,
    AutoPlanner,
    StepPlan,
    candidate_plans,
    channels_last_applies,
)

f64 = torch.float64


def _image_tasks(n: int = 3, ways: int = 3, size: int = 16, dtype=f64) -> mf.Task:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(ways).repeat(n, 2)
    return mf.Task(torch.randn(n, 2 * ways, 1, size, size, generator=g, dtype=dtype), labels,
                   torch.randn(n, 2 * ways, 1, size, size, generator=g, dtype=dtype), labels)


@pytest.mark.parametrize("norm", ["batch", "group", "instance"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
def test_the_channels_last_loop_equals_the_autograd_reference_and_returns_gradients_in_the_parameters_layout(
        norm, first_order, workers):
    torch.manual_seed(0)
    module = torch_conv4(3, width=4, image_size=16, norm=norm).to(f64)
    model, params = mf.functionalize(module)
    tasks = _image_tasks()
    learner = mf.maml(model, inner_lr=0.3, steps=2, first_order=first_order)
    want = reference_meta_gradient(module, params, tasks, algorithm="fomaml" if first_order else "maml",
                                   inner_lr=0.3, steps=2, loss="cross_entropy")
    step = mf.meta_value_and_grad(learner, mode="loop", workers=workers, channels_last=True)
    _, _, grads = step(params, tasks)
    assert step.plan == StepPlan("loop", workers=workers, channels_last=True)
    assert relative_error(grads, want) < 1e-10
    assert all(grads[k].stride() == params[k].stride() for k in params)


def test_metafunc_learners_on_the_channels_last_loop_equal_the_default_layout():
    torch.manual_seed(0)
    model, params = mf.functionalize(mf.models.conv4(ways=3, width=4, image_size=16).to(f64))
    encoder = nn.Sequential(mf.models.conv4(ways=3, width=4, image_size=16).features, nn.Flatten())
    features, feature_params = mf.functionalize(encoder.to(f64))
    tasks = _image_tasks()
    for learner, p in ((mf.proto_maml(features, inner_lr=0.1, steps=2), feature_params),
                       (mf.protonet(features), feature_params), (mf.imaml(model, inner_lr=0.1, steps=2), params),
                       (mf.maml(model, inner_lr=0.3, steps=3), params)):
        want = mf.meta_value_and_grad(learner, mode="loop", channels_last=False)(p, tasks)[2]
        got = mf.meta_value_and_grad(learner, mode="loop", channels_last=True)(p, tasks)[2]
        assert relative_error(got, want) < 1e-12, learner


def test_auto_tries_the_channels_last_loop_first_for_images_on_the_cpu_and_never_for_other_inputs():
    model, params = mf.functionalize(mf.models.conv4(ways=3, width=4, image_size=16))
    learner = mf.maml(model, inner_lr=0.3)
    tasks = _image_tasks(4, dtype=torch.float32)
    assert channels_last_applies(params, tasks)
    plans = candidate_plans(learner, params, tasks, loop_workers=2)
    assert plans[:4] == [StepPlan("loop", workers=2, channels_last=True), StepPlan("loop", channels_last=True),
                         StepPlan("loop", workers=2), StepPlan("loop")]
    assert candidate_plans(learner, params, tasks, channels_last=True) == [StepPlan("loop", channels_last=True)]
    assert not any(p.channels_last for p in candidate_plans(learner, params, tasks, channels_last=False))
    mlp, mlp_params = mf.functionalize(mf.models.mlp())
    sine = mf.sinusoid_tasks(4, shots=5, generator=torch.Generator().manual_seed(0))
    assert not channels_last_applies(mlp_params, sine)
    assert not any(p.channels_last for p in candidate_plans(mf.maml(mlp, inner_lr=0.01, loss="mse"), mlp_params, sine))


class _FlattensWithView(nn.Module):
    """A model whose ``view`` needs NCHW-contiguous activations: it cannot take the channels-last layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.head(h.view(h.shape[0], -1))


def test_a_model_that_cannot_take_the_layout_runs_in_the_default_one_and_a_forced_channels_last_says_why():
    torch.manual_seed(0)
    model, params = mf.functionalize(_FlattensWithView().to(f64))
    learner = mf.maml(model, inner_lr=0.1)
    tasks = _image_tasks()
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        mf.meta_value_and_grad(learner, mode="loop", channels_last=True)(params, tasks)
    want = mf.meta_value_and_grad(learner, mode="loop", channels_last=False)(params, tasks)[2]
    step = mf.meta_value_and_grad(learner)
    for _ in range(2 * AUTO_TRIALS + 4):
        _, _, grads = step(params, tasks)
        assert not step.plan.channels_last and relative_error(grads, want) < 1e-12
    skipped = step.planner.report()["skipped"]
    assert {p for p in skipped if "channels-last" in p} == {"loop, 2 tasks at once, channels-last",
                                                             "loop, channels-last"}
    assert all("view size is not compatible" in why for p, why in skipped.items() if "channels-last" in p)


@pytest.mark.parametrize("two, one, chosen", [(1.00, 1.00 + AUTO_TIE / 2, "loop"),
                                              (1.00, 1.00 + 1.5 * AUTO_TIE, "loop, 2 tasks at once"),
                                              (1.00 + AUTO_TIE / 2, 1.00, "loop")])
def test_a_tie_goes_to_the_plan_with_fewer_tasks_in_flight(monkeypatch, two, one, chosen):
    seconds = {StepPlan("loop", workers=2): two, StepPlan("loop"): one}
    monkeypatch.setattr(planning, "_timed", lambda run_plan, plan: (run_plan(plan), seconds[plan]))
    planner = AutoPlanner()
    ran = [planner.run("k", lambda: list(seconds), str)[0] for _ in range((AUTO_TRIALS + AUTO_CONFIRM) * 2 + 1)]
    assert planner.report("k")["chosen"] == chosen == ran[-1]
    # two and one task at a time are in a close race (within twice the tie): each was timed AUTO_CONFIRM times more
    assert sorted(ran[:-1]) == sorted(["loop", "loop, 2 tasks at once"] * (AUTO_TRIALS + AUTO_CONFIRM))


def test_a_candidate_far_behind_is_not_timed_again(monkeypatch):
    seconds = {StepPlan("loop", workers=2): 1.0, StepPlan("loop"): 1.0 + 3 * AUTO_TIE}
    monkeypatch.setattr(planning, "_timed", lambda run_plan, plan: (run_plan(plan), seconds[plan]))
    planner = AutoPlanner()
    ran = [planner.run("k", lambda: list(seconds), str)[0] for _ in range(AUTO_TRIALS * 2 + 1)]
    assert planner.report("k")["chosen"] == "loop, 2 tasks at once" == ran[-1]


def test_channels_last_is_refused_with_its_fix_before_anything_runs():
    model, _ = mf.functionalize(mf.models.conv4(ways=3, width=4, image_size=16))
    learner = mf.maml(model, inner_lr=0.3)
    with pytest.raises(TypeError, match=r"meta_value_and_grad: channels_last must be True, False or None \(got 'yes'\)"):
        mf.meta_value_and_grad(learner, channels_last="yes")
    with pytest.raises(ValueError, match=r"channels_last=True .* needs mode='loop' or 'auto' \(got mode='vmap'\)"):
        mf.meta_value_and_grad(learner, mode="vmap", channels_last=True)


def test_the_trainer_runs_a_measured_channels_last_plan():
    from metafunc.train import TrainConfig, build_experiment, resolve_config
    from metafunc.train.loop import trainer_step

    cfg = resolve_config(TrainConfig(dataset="synthetic", width=8, meta_batch=2))
    exp = build_experiment(cfg)
    step = trainer_step(exp, cfg, StepPlan("loop", channels_last=True))
    tasks = exp.sources["train"].sample(2, torch.Generator().manual_seed(0))
    _, _, grads = step(exp.params, tasks)
    want = trainer_step(exp, cfg, StepPlan("loop"))(exp.params, tasks)[2]
    assert step.plan == StepPlan("loop", channels_last=True)
    assert relative_error(grads, want) < 1e-5


def test_the_cli_fixes_the_loop_layout_and_workers_and_auto_keeps_them():
    from metafunc.cli import build_parser
    from metafunc.cli.options import train_config_from_args
    from metafunc.train import build_experiment, resolve_config
    from metafunc.train.loop import measured_plan, trainer_step

    args = build_parser().parse_args(["train", "--dataset", "synthetic", "--width", "8", "--meta-batch", "2",
                                      "--mode", "loop", "--workers", "1", "--channels-last"])
    cfg = resolve_config(train_config_from_args(args))
    assert (cfg.workers, cfg.channels_last) == (1, True)
    exp = build_experiment(cfg)
    step = trainer_step(exp, cfg)
    step(exp.params, exp.sources["train"].sample(2, torch.Generator().manual_seed(0)))
    assert step.plan == StepPlan("loop", workers=1, channels_last=True)
    # under mode="auto" the fixed settings bound what is measured: only NCHW plans, one task at a time
    args = build_parser().parse_args(["train", "--dataset", "synthetic", "--width", "8", "--meta-batch", "2",
                                      "--workers", "1", "--no-channels-last"])
    cfg = resolve_config(train_config_from_args(args))
    plan = measured_plan(build_experiment(cfg), cfg, build_experiment(cfg).sources["train"])
    assert plan is not None and not plan.channels_last and (plan.mode == "vmap" or plan.workers == 1)


@pytest.mark.parametrize("flags, message", [
    (["--mode", "vmap", "--channels-last"], r"train: --channels-last sets how the loop runs its tasks, but --mode vmap"),
    (["--mode", "vmap", "--workers", "2"], r"train: --workers 2 sets how the loop runs its tasks, but --mode vmap"),
    (["--workers", "0"], r"train: workers must be >= 1 \(got 0\)"),
])
def test_loop_flags_that_cannot_apply_are_refused_before_training(flags, message):
    from metafunc.cli import build_parser
    from metafunc.cli.options import train_config_from_args
    from metafunc.train import resolve_config

    args = build_parser().parse_args(["train", "--dataset", "synthetic", *flags])
    with pytest.raises(ValueError, match=message):
        resolve_config(train_config_from_args(args))
