"""The meta-training loop: exact resume, crash safety, rank-aware writing, the replaceable meta-gradient step, the
meta-gradient it computes (float64, vmap and loop, against an autograd loop), and evaluation statistics."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from metafunc import functionalize, maml, meta_value_and_grad, models
from metafunc.core.tree import tree_relative_error
from metafunc.train import GaussianClassification, SinusoidSource, TrainConfig, build_experiment, resolve_config, train
from metafunc.train.checkpoint import load_checkpoint
from metafunc.train.evaluation import BATCHNORM_PROTOCOL, confidence_interval, evaluate_episodes, task_scores


def _cfg(tmp_path, name, **kw):
    base = dict(dataset="synthetic", iterations=6, meta_batch=3, width=8, val_every=0, val_episodes=3,
                checkpoint_every=0, out=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


def test_an_auto_run_measures_its_plan_once_keeps_it_in_the_checkpoint_and_a_resumed_run_continues_with_it(tmp_path):
    part = _cfg(tmp_path, "part", dataset="sinusoid")
    first = train(part, progress=False, stop_after=3)
    assert first.plan is not None and first.plan.mode in ("loop", "vmap")
    assert load_checkpoint(first.out / "checkpoint.pt")["plan"] == first.plan._asdict()
    resumed = train(part, resume=True, progress=False)
    assert resumed.plan == first.plan
    # the same run with that plan fixed, uninterrupted: bit for bit (measuring drew no task and no torch RNG)
    fixed = dict(mode=first.plan.mode, chunk_size=first.plan.chunk_size)
    full = train(_cfg(tmp_path, "full", dataset="sinusoid", **fixed), progress=False)
    assert full.plan is None
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)
    assert _train_records(full.out) == _train_records(resumed.out)


def _train_records(out, *, timing: bool = False):
    """The train records of ``metrics.jsonl``; without the wall-clock ``train_seconds`` unless ``timing``."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if json.loads(line)["split"] == "train"]
    return records if timing else [{k: v for k, v in r.items() if k != "train_seconds"} for r in records]


@pytest.mark.parametrize("dataset,algorithm", [("synthetic", "maml"), ("sinusoid", "meta_sgd")])
def test_resumed_run_matches_an_uninterrupted_one_bit_for_bit(tmp_path, dataset, algorithm):
    # a fixed plan: two independent runs agree bit for bit only when they run their meta-batches the same way
    full = train(_cfg(tmp_path, "full", dataset=dataset, algorithm=algorithm, mode="loop"), progress=False)
    part = _cfg(tmp_path, "part", dataset=dataset, algorithm=algorithm, mode="loop")
    first = train(part, progress=False, stop_after=3)
    assert load_checkpoint(first.out / "checkpoint.pt")["iteration"] == 3
    resumed = train(part, resume=True, progress=False)
    assert full.params.keys() == resumed.params.keys()
    for k in full.params:
        assert torch.equal(full.params[k], resumed.params[k]), k
    full_opt = load_checkpoint(full.out / "checkpoint.pt")["optimizer"]["state"]
    resumed_opt = load_checkpoint(resumed.out / "checkpoint.pt")["optimizer"]["state"]
    for i in full_opt:
        assert torch.equal(full_opt[i]["exp_avg_sq"], resumed_opt[i]["exp_avg_sq"])
    a, b = _train_records(full.out), _train_records(resumed.out)
    assert [r["iteration"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert a == b  # same losses at every iteration, each logged once


def test_crash_mid_training_keeps_the_last_checkpoint_and_resume_completes_the_run(tmp_path):
    calls = {"n": 0}

    def crashing(step):
        def run(params, tasks):
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("simulated crash at iteration 5")
            return step(params, tasks)
        return run

    cfg = _cfg(tmp_path, "crash", checkpoint_every=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, progress=False, wrap_step=crashing)
    assert load_checkpoint(tmp_path / "crash" / "checkpoint.pt")["iteration"] == 4
    assert sorted(p.name for p in (tmp_path / "crash").iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt", "config.json",
                                                                    "metrics.jsonl"]
    resumed = train(cfg, resume=True, progress=False)
    full = train(_cfg(tmp_path, "full", checkpoint_every=2), progress=False)
    assert tree_relative_error(resumed.params, full.params) == 0.0
    assert [r["iteration"] for r in _train_records(resumed.out)] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_another_configuration_and_a_finished_run(tmp_path):
    cfg = _cfg(tmp_path, "run", iterations=2)
    train(cfg, progress=False)
    with pytest.raises(ValueError, match=r"train --resume: the checkpoint is from another configuration \(inner_lr: "
                                         r"checkpoint 0.4 vs now 0.1\)"):
        train(_cfg(tmp_path, "run", iterations=4, inner_lr=0.1), resume=True, progress=False)
    with pytest.raises(ValueError, match="has already done 2 iterations; pass --iterations larger than 2"):
        train(cfg, resume=True, progress=False)
    with pytest.raises(ValueError, match="from another model"):
        train(_cfg(tmp_path, "run", iterations=4, width=4), resume=True, progress=False)


def test_outputs_metrics_validation_and_plot(tmp_path):
    result = train(_cfg(tmp_path, "run", iterations=4, val_every=2), progress=False)
    names = sorted(p.name for p in result.out.iterdir())
    assert names == ["checkpoint.pt", "config.json", "learning_curve.png", "metrics.jsonl"]
    records = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert [r["iteration"] for r in val] == [2, 4]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["episodes"] == 3 and r["inner_steps"] == 3 for r in val)
    train_recs = [r for r in records if r["split"] == "train"]
    assert len(train_recs) == 4 and all(math.isfinite(r["loss"]) and "accuracy" in r for r in train_recs)
    assert json.loads((result.out / "config.json").read_text())["meta_batch"] == 3
    assert (result.out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_only_the_main_process_writes(tmp_path, monkeypatch):
    result = train(_cfg(tmp_path, "worker", iterations=2), progress=False, is_main=False)
    assert not (tmp_path / "worker").exists()
    assert [r["iteration"] for r in result.records] == [1, 2]
    monkeypatch.setenv("RANK", "1")
    train(_cfg(tmp_path, "rank1", iterations=1), progress=False)
    assert not (tmp_path / "rank1").exists()


def test_the_meta_step_is_wrappable(tmp_path):
    seen = []

    def zeroed(step):
        def run(params, tasks):
            seen.append(tasks.num_tasks)
            loss, metrics, grads = step(params, tasks)
            return loss, metrics, {k: g * 0.0 for k, g in grads.items()}  # zero gradient: the weights stay put
        return run

    cfg = _cfg(tmp_path, "zero", iterations=3)
    before = build_experiment(cfg).params
    result = train(cfg, progress=False, wrap_step=zeroed)
    assert seen == [3, 3, 3]
    assert tree_relative_error(result.params, before) == 0.0


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_training_meta_gradient_equals_an_autograd_loop_in_float64(float64, mode):
    torch.manual_seed(1)
    model, params = functionalize(models.mlp(in_features=3, hidden=(6,), out_features=4, norm="layer"))
    learner = maml(model, inner_lr=0.3, steps=2)
    tasks = GaussianClassification(ways=4, shots=2, queries=3, dim=3, dtype=torch.float64).sample(
        3, torch.Generator().manual_seed(0))
    loss, _, got = meta_value_and_grad(learner, mode=mode)(params, tasks)   # the trainer's step

    reference = {k: torch.zeros_like(v) for k, v in params.items()}
    total = 0.0
    for i in range(tasks.num_tasks):
        t = tasks.task_at(i)
        fast = dict(params)
        for _ in range(2):
            inner = F.cross_entropy(model(fast, t.support_x), t.support_y)
            grads = torch.autograd.grad(inner, list(fast.values()), create_graph=True)
            fast = {k: w - 0.3 * g for (k, w), g in zip(fast.items(), grads)}
        outer = F.cross_entropy(model(fast, t.query_x), t.query_y) / tasks.num_tasks
        total += float(outer.detach())
        for k, g in zip(params, torch.autograd.grad(outer, list(params.values()))):
            reference[k] += g
    assert tree_relative_error(got, reference) < 1e-10
    assert abs(float(loss) - total) < 1e-12


def test_config_defaults_follow_the_papers_and_bad_values_are_refused():
    omni = resolve_config(TrainConfig(dataset="omniglot"))
    assert (omni.meta_batch, omni.inner_lr, omni.inner_steps, omni.eval_inner_steps, omni.outer_lr) == (32, 0.4, 1, 3,
                                                                                                         1e-3)
    sin = resolve_config(TrainConfig())
    assert (sin.shots, sin.meta_batch, sin.inner_lr, sin.inner_steps, sin.outer_lr) == (10, 25, 0.01, 1, 1e-3)
    with pytest.raises(ValueError, match=r"train: inner_lr must be > 0 \(got -0.1\)"):
        resolve_config(TrainConfig(inner_lr=-0.1))
    with pytest.raises(ValueError, match=r"train: unknown algorithm 'mamll'; choose one of .*maml"):
        resolve_config(TrainConfig(algorithm="mamll"))
    with pytest.raises(ValueError, match="'protonet' is a few-shot classifier; use it with --dataset omniglot"):
        resolve_config(TrainConfig(algorithm="protonet"))
    with pytest.raises(ValueError, match=r"train: meta_batch must be >= 1 \(got 0\)"):
        resolve_config(TrainConfig(meta_batch=0))
    with pytest.raises(ValueError, match="train: ways must be >= 2 for classification"):
        resolve_config(TrainConfig(dataset="synthetic", ways=1))


def test_omniglot_with_a_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train: data root '.*nowhere' does not exist"):
        train(TrainConfig(dataset="omniglot", data_root=str(tmp_path / "nowhere"), out=str(tmp_path / "o")),
              progress=False)


def test_confidence_interval_is_1_96_std_over_sqrt_n():
    values = torch.tensor([0.6, 0.8, 1.0, 0.4, 0.7])
    mean, ci, std = confidence_interval(values)
    expected_std = math.sqrt(sum((v - 0.7) ** 2 for v in [0.6, 0.8, 1.0, 0.4, 0.7]) / 4)
    assert mean == pytest.approx(0.7) and std == pytest.approx(expected_std)
    assert ci == pytest.approx(1.96 * expected_std / math.sqrt(5))
    with pytest.raises(ValueError, match="confidence_interval: values is empty"):
        confidence_interval(torch.zeros(0))


def test_task_scores_without_adaptation_is_the_plain_query_error():
    model, params = functionalize(models.mlp(hidden=(8,)))
    tasks = SinusoidSource(shots=5, queries=7).sample(4, torch.Generator().manual_seed(0))
    learner = maml(model, inner_lr=0.01, loss="mse")
    with torch.no_grad():
        expected = torch.stack([F.mse_loss(model(params, tasks.query_x[i]), tasks.query_y[i]) for i in range(4)])
    for mode in ("vmap", "loop"):
        assert torch.allclose(task_scores(learner, params, tasks, steps=0, classification=False, mode=mode), expected)
    adapted = task_scores(learner, params, tasks, steps=1, classification=False)
    fast = [learner.adapt(params, tasks.support_x[i], tasks.support_y[i])[0] for i in range(4)]
    with torch.no_grad():
        manual = torch.stack([F.mse_loss(model(fast[i], tasks.query_x[i]), tasks.query_y[i]) for i in range(4)])
    assert torch.allclose(adapted, manual, atol=1e-6)


def test_evaluate_episodes_counts_episodes_and_is_seeded():
    model, params = functionalize(models.mlp(in_features=8, hidden=(8,), out_features=3))
    learner = maml(model, inner_lr=0.4)
    src = GaussianClassification(ways=3, shots=1, queries=2)
    a = evaluate_episodes(learner, params, src, episodes=7, steps=2, classification=True,
                          generator=torch.Generator().manual_seed(0), batch=3)
    b = evaluate_episodes(learner, params, src, episodes=7, steps=2, classification=True,
                          generator=torch.Generator().manual_seed(0), batch=3)
    assert a.episodes == 7 and a.metric == "accuracy" and 0.0 <= a.mean <= 1.0
    assert a.mean == pytest.approx(b.mean) and a.ci95 == pytest.approx(b.ci95)
    assert "95% CI, 7 episodes, 2 inner steps" in a.format()
    assert BATCHNORM_PROTOCOL == "transductive: BatchNorm uses each task's batch statistics"


def test_time_budget_ends_on_time_is_recorded_and_resume_spends_what_is_left(tmp_path):
    import time

    cfg = _cfg(tmp_path, "budget", iterations=None, time_budget=1.0, val_every=0)
    start = time.perf_counter()
    result = train(cfg, progress=False)
    wall = time.perf_counter() - start
    steps = [r for r in result.records if r["split"] == "train"]
    last_step = steps[-1]["train_seconds"] - steps[-2]["train_seconds"]
    assert 1.0 <= result.train_seconds < 1.0 + last_step + 1e-6      # stops at the first step past the budget
    assert wall < 1.0 + 20                                            # sampling and validation are not counted
    assert [r["split"] for r in result.records][-1] == "val"           # validated at the stop
    saved = load_checkpoint(tmp_path / "budget" / "checkpoint.pt")
    assert saved["iteration"] == steps[-1]["iteration"] > 5 and saved["time_budget"] == 1.0
    assert abs(saved["train_seconds"] - result.train_seconds) < 1e-9
    assert json.loads((tmp_path / "budget" / "config.json").read_text())["time_budget"] == 1.0
    more = train(_cfg(tmp_path, "budget", iterations=None, time_budget=1.6, val_every=0), resume=True, progress=False)
    assert 1.6 <= more.train_seconds and more.records[-1]["iteration"] > saved["iteration"]
    with pytest.raises(ValueError, match=r"has already spent 1\.\d s of its 1\.6 s budget; pass a larger --time-budget"):
        train(_cfg(tmp_path, "budget", iterations=None, time_budget=1.6, val_every=0), resume=True, progress=False)
    with pytest.raises(ValueError, match=r"train: time_budget must be > 0 \(got -1\)"):
        train(_cfg(tmp_path, "bad", time_budget=-1), progress=False)


def test_reptile_with_an_sgd_outer_step_of_1_moves_to_the_mean_adapted_weights(tmp_path):
    # Reptile's interpolation step theta <- theta + eps * (mean_i phi_i - theta) at eps = 1 lands on the mean of the
    # task-adapted weights; phi_i computed here by a plain torch.autograd SGD loop, not by metafunc's inner loop.
    cfg = _cfg(tmp_path, "reptile", algorithm="reptile", iterations=1, inner_steps=3, inner_lr=0.2, outer_lr=1.0,
               outer_optimizer="sgd")
    exp = build_experiment(resolve_config(cfg))
    seen = []

    def record(step):
        def run(params, tasks):
            seen.append(({k: v.detach().clone() for k, v in params.items()}, tasks))
            return step(params, tasks)
        return run

    result = train(cfg, progress=False, wrap_step=record)
    start, tasks = seen[0]
    adapted = []
    for i in range(tasks.num_tasks):
        phi = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        for _ in range(3):
            loss = F.cross_entropy(exp.model(phi, tasks.support_x[i]), tasks.support_y[i])
            grads = torch.autograd.grad(loss, list(phi.values()))
            phi = {k: (v - 0.2 * g).detach().requires_grad_(True) for (k, v), g in zip(phi.items(), grads)}
        adapted.append(phi)
    mean_adapted = {k: torch.stack([a[k] for a in adapted]).mean(0) for k in start}
    assert tree_relative_error(result.params, mean_adapted) < 1e-5   # float32 rounding
    assert tree_relative_error(start, mean_adapted) > 1e-3   # the step did move the weights


def test_linear_outer_lr_schedule_anneals_to_zero_and_resume_refuses_another_optimizer(tmp_path):
    cfg = _cfg(tmp_path, "linear", iterations=4, outer_lr=0.5, outer_optimizer="sgd", outer_lr_schedule="linear")
    steps = []

    def record(step):
        def run(params, tasks):
            loss, metrics, grads = step(params, tasks)
            steps.append(({k: v.detach().clone() for k, v in params.items()}, grads))
            return loss, metrics, grads
        return run

    result = train(cfg, progress=False, wrap_step=record)
    after = [p for p, _ in steps[1:]] + [result.params]
    for (before, grads), nxt, lr in zip(steps, after, [0.5, 0.375, 0.25, 0.125]):
        expected = {k: before[k] - lr * grads[k] for k in before}
        assert tree_relative_error(nxt, expected) < 1e-6, lr
    with pytest.raises(ValueError, match=r"outer_optimizer: checkpoint 'sgd' vs now 'adam'"):
        train(_cfg(tmp_path, "linear", iterations=6, outer_lr=0.5, outer_lr_schedule="linear"), resume=True,
              progress=False)
    with pytest.raises(ValueError, match=r"anneals by each process's own clock, so the processes of a distributed "
                                         r"run would step differently; pass --iterations and no --time-budget"):
        train(_cfg(tmp_path, "dist", time_budget=1.0, outer_lr_schedule="linear"), progress=False,
              sync_flag=lambda *flags: flags)
    assert not (tmp_path / "dist").exists()   # refused before anything was built or written
    with pytest.raises(ValueError, match=r"train: outer_optimizer must be one of 'adam', 'sgd' \(got 'rmsprop'\)"):
        resolve_config(TrainConfig(outer_optimizer="rmsprop"))
    with pytest.raises(ValueError, match=r"train: outer_lr_schedule must be one of 'constant', 'linear', 'cosine'"):
        resolve_config(TrainConfig(outer_lr_schedule="exponential"))


def test_a_checkpoint_written_before_the_outer_optimizer_setting_resumes_as_adam(tmp_path):
    cfg = _cfg(tmp_path, "old", iterations=2)
    first = train(cfg, progress=False, stop_after=1)
    path = first.out / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    for key in ("outer_optimizer", "outer_lr_schedule"):
        del ckpt["config"][key]
    torch.save(ckpt, path)
    resumed = train(cfg, resume=True, progress=False)
    assert [r["iteration"] for r in _train_records(resumed.out)] == [1, 2]
