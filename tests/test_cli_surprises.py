"""Regression tests for what a new user met in the first minutes (issue: the trainer as one thin loop): every
``--help`` runs, a finished run is never silently overwritten, bad devices are named, metric learners never talk
about inner steps, one file mode for a run's files, the validation split never caps the ways."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from metafunc.cli import main
from metafunc.train import load_checkpoint

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
SMOKE = ["--dataset", "synthetic", "--width", "8", "--no-progress", "--val-episodes", "4"]


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["train", "--help"], ["evaluate", "--help"],
                                  ["bench", "--help"]], ids=lambda a: " ".join(a))
def test_every_help_prints_and_exits_0(argv):
    done = subprocess.run([sys.executable, "-m", "metafunc", *argv], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "Traceback" not in done.stderr


def test_a_finished_run_is_refused_without_resume_or_overwrite_and_nothing_is_lost(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *SMOKE, "--iterations", "3", "--out", out]) == 0
    files = {name: (tmp_path / "run" / name).read_bytes() for name in ("metrics.jsonl", "checkpoint.pt", "config.json")}
    capsys.readouterr()
    assert main(["train", *SMOKE, "--iterations", "5", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (its checkpoint is at iteration 3)" in err
    assert "--resume" in err and "--overwrite" in err
    assert {name: (tmp_path / "run" / name).read_bytes() for name in files} == files   # byte for byte
    assert main(["train", *SMOKE, "--iterations", "5", "--out", out, "--resume"]) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["iteration"] == 5
    assert main(["train", *SMOKE, "--iterations", "2", "--out", out, "--overwrite"]) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["iteration"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iteration"] for r in records) == 2          # the old run's records are gone, not appended to
    assert not (tmp_path / "run" / "checkpoint.prev.pt").exists() or \
        load_checkpoint(tmp_path / "run" / "checkpoint.prev.pt")["iteration"] < 2


@pytest.mark.parametrize("device,says", [("mps", "not supported for training"), ("meta", "not supported for training"),
                                         ("gpu0", "must be a torch device")])
def test_unknown_or_unsupported_devices_are_named_with_the_fix(tmp_path, capsys, device, says):
    assert main(["train", *SMOKE, "--iterations", "1", "--out", str(tmp_path), "--device", device]) == 2
    err = capsys.readouterr().err
    assert says in err and repr(device) in err and "--device cpu" in err and "Traceback" not in err


def test_run_files_share_one_mode(tmp_path):
    assert main(["train", *SMOKE, "--iterations", "2", "--out", str(tmp_path)]) == 0
    modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)
             for name in ("config.json", "metrics.jsonl", "checkpoint.pt")}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_metric_learners_never_talk_about_inner_steps(tmp_path, capsys):
    assert main(["train", *SMOKE, "--algorithm", "protonet", "--iterations", "2", "--out", str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert "no inner loop" in said and "inner lr" not in said and "steps)" not in said
    assert main(["evaluate", str(tmp_path / "checkpoint.pt"), "--episodes", "10", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "no inner loop" in said and "inner steps" not in said


def test_sinusoid_evaluation_states_no_batchnorm_protocol_for_an_mlp(tmp_path, capsys):
    assert main(["train", "--iterations", "2", "--no-baseline", "--no-progress", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "checkpoint.pt"), "--episodes", "10", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "BatchNorm" not in said and "1 inner steps" not in said and "10 inner steps" in said


@pytest.mark.data
def test_only_a_network_with_batchnorm_states_the_batchnorm_protocol(data_root):
    from metafunc.train import TrainConfig, build_experiment, resolve_config
    assert build_experiment(resolve_config(TrainConfig(dataset="synthetic"))).batch_norm is False
    cfg = resolve_config(TrainConfig(dataset="omniglot", data_root=str(data_root / "omniglot"), width=8))
    assert build_experiment(cfg).batch_norm is True


@pytest.mark.data
@pytest.mark.slow
def test_omniglot_trains_at_60_ways_and_tests_at_30_ways_while_validation_has_20_characters(tmp_path, capsys,
                                                                                         data_root):
    out = str(tmp_path / "run")
    assert main(["train", "--dataset", "omniglot", "--data-root", str(data_root / "omniglot"), "--algorithm", "protonet",
                 "--ways", "60", "--shots", "1", "--queries", "2", "--meta-batch", "1", "--iterations", "2",
                 "--width", "8", "--val-episodes", "2", "--no-progress", "--out", out]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["split"] == "val"] == [2]
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run" / "checkpoint.pt"), "--ways", "30", "--split", "test",
                 "--episodes", "4", "--meta-batch", "2", "--no-progress"]) == 0, capsys.readouterr().err
    assert "30-way 1-shot" in capsys.readouterr().out


def test_val_ways_is_refused_for_a_dataset_that_does_not_take_it(tmp_path, capsys):
    assert main(["train", *SMOKE, "--iterations", "1", "--val-ways", "3", "--out", str(tmp_path)]) == 2
    assert "--val-ways is not taken by dataset synthetic" in capsys.readouterr().err


def test_resolve_config_runs_once_for_a_resolved_config():
    from metafunc.train import TrainConfig, resolve_config
    cfg = resolve_config(TrainConfig(dataset="synthetic"))
    assert resolve_config(cfg) is cfg
    with pytest.raises(ValueError, match="train: unknown dataset 'omniglott'"):
        resolve_config(TrainConfig(dataset="omniglott"))


def test_validation_at_other_shots_than_training(tmp_path):
    from metafunc.train import TrainConfig, build_experiment, resolve_config, train
    cfg = resolve_config(TrainConfig(dataset="synthetic", ways=3, shots=4, val_shots=1, queries=2, val_queries=5,
                                     width=8, iterations=2, val_every=1, out=str(tmp_path)))
    exp = build_experiment(cfg)
    gen = torch.Generator().manual_seed(0)
    assert exp.sources["train"].sample(2, gen).support_x.shape[1] == 3 * 4
    assert exp.sources["val"].sample(2, gen).support_x.shape[1] == 3 * 1
    assert exp.sources["val"].sample(2, gen).query_x.shape[1] == 3 * 5
    assert exp.sources["test"].sample(2, gen).support_x.shape[1] == 3 * 4
    result = train(cfg, progress=False)
    assert [r["iteration"] for r in result.records if r["split"] == "val"] == [1, 2]


def test_cosine_outer_lr_schedule_reaches_the_optimizer(tmp_path):
    import math

    from metafunc.train import COSINE_FLOOR
    assert main(["train", *SMOKE, "--iterations", "3", "--outer-lr", "0.01", "--outer-lr-schedule", "cosine",
                 "--out", str(tmp_path)]) == 0
    lr = load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]["param_groups"][0]["lr"]
    floor = COSINE_FLOOR * 0.01
    assert abs(lr - (floor + (0.01 - floor) * 0.5 * (1 + math.cos(math.pi * 2 / 3)))) < 1e-12   # step 3 used i=2


def test_maml_plus_plus_is_rebuilt_at_each_epoch_and_a_resumed_run_continues_in_its_epoch(tmp_path, monkeypatch):
    import dataclasses
    import functools

    from metafunc import LEARNERS
    from metafunc.train import TrainConfig, train

    spec, epochs = LEARNERS["maml_plus_plus"], []

    @functools.wraps(spec.factory)
    def spy(model, **options):
        epochs.append(options.get("epoch"))
        return spec.factory(model, **options)

    monkeypatch.setitem(LEARNERS, "maml_plus_plus", dataclasses.replace(spec, factory=spy))
    cfg = dict(dataset="synthetic", algorithm="maml_plus_plus", width=8, inner_steps=2, epoch_length=2,
               val_every=0, val_episodes=4, out=str(tmp_path), options={"first_order_epochs": 1})
    train(TrainConfig(iterations=5, **cfg), progress=False, stop_after=3)
    assert [e for e in epochs if e is not None] == [0, 1]          # iterations 1-2 in epoch 0, 3 in epoch 1
    epochs.clear()
    train(TrainConfig(iterations=5, **cfg), resume=True, progress=False)
    assert [e for e in epochs if e is not None] == [1, 2]          # resumed at iteration 3: epoch 1, then 2
    with pytest.raises(ValueError, match="takes no option"):
        train(TrainConfig(iterations=5, **{**cfg, "options": {"epoch": 3}}), overwrite=True, progress=False)
