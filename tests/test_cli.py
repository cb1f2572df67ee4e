"""The ``metafunc`` command: parsing, config files, the sinusoid main job, resume, evaluate, bench dispatch, errors."""

import json
import re
import subprocess
import sys
import types

import pytest
import torch

from metafunc.cli import build_parser, load_config_file, main, train_config_from_args
from metafunc.train import resolve_config
from metafunc.train.checkpoint import load_checkpoint

SMALL = ["--dataset", "synthetic", "--width", "8", "--meta-batch", "3", "--val-episodes", "4", "--no-progress"]


def test_no_arguments_is_the_maml_paper_sinusoid_setting():
    cfg = resolve_config(train_config_from_args(build_parser().parse_args(["train"])))
    assert (cfg.algorithm, cfg.dataset, cfg.shots, cfg.meta_batch, cfg.inner_lr, cfg.inner_steps, cfg.outer_lr,
            cfg.iterations) == ("maml", "sinusoid", 10, 25, 0.01, 1, 1e-3, 70000)   # and the paper's 70,000 iterations


def test_config_file_json_and_toml_with_flags_overriding(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"algorithm": "anil", "meta-batch": 7, "steps": 12, "shots": 3}))
    (tmp_path / "c.toml").write_text('algorithm = "fomaml"\ninner_lr = 0.2\ndataset = "omniglot"\n')
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.json"), "--shots", "4"])
    cfg = train_config_from_args(args)
    assert (cfg.algorithm, cfg.meta_batch, cfg.iterations, cfg.shots) == ("anil", 7, 12, 4)
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.toml"), "--inner-lr", "0.3"])
    cfg = train_config_from_args(args)
    assert (cfg.algorithm, cfg.inner_lr, cfg.dataset) == ("fomaml", 0.3, "omniglot")
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(ValueError, match=r"unknown setting 'learning_rate' in .*bad\.json"):
        load_config_file(tmp_path / "bad.json")
    (tmp_path / "broken.toml").write_text("algorithm = \n")
    with pytest.raises(ValueError, match=r"cannot parse config file .*broken\.toml' \(TOML\)"):
        load_config_file(tmp_path / "broken.toml")


def test_sinusoid_main_job_prints_the_table_and_saves_the_figures(tmp_path, capsys):
    out = tmp_path / "sin"
    rc = main(["train", "--iterations", "3", "--eval-episodes", "8", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "query MSE on 8 held-out tasks" in text
    assert re.search(r"maml\s+[\d.]+ \+- [\d.]+\s+[\d.]+ \+- [\d.]+\s+[\d.]+ \+- [\d.]+", text)
    assert re.search(r"pretrained\s+[\d.]+ \+- [\d.]+", text)
    results = json.loads((out / "sinusoid_results.json").read_text())
    assert set(results["results"]) == {"maml", "pretrained"} and set(results["results"]["maml"]) == {"0", "1", "10"}
    for name in ("sinusoid_adaptation.png", "learning_curve.png", "checkpoint.pt", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0


def test_train_then_resume_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--iterations", "2", "--out", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 2
    # --resume reads the settings from the checkpoint; only --iterations changes
    assert main(["train", "--resume", "--out", str(out), "--iterations", "4", "--no-progress"]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["iteration"] == 4 and ckpt["config"]["width"] == 8 and ckpt["config"]["dataset"] == "synthetic"
    capsys.readouterr()
    assert main(["evaluate", str(out / "checkpoint.pt"), "--episodes", "10", "--shots", "2", "--inner-steps", "2",
                 "--json", str(tmp_path / "e.json")]) == 0
    text = capsys.readouterr().out
    assert "5-way 2-shot" in text and "2 inner steps" in text
    assert re.search(r"accuracy \d+\.\d\d% \+- \d+\.\d\d% \(95% CI, 10 episodes, 2 inner steps\)", text)
    assert "BatchNorm" not in text          # the synthetic MLP has LayerNorm: no BatchNorm protocol to state
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["episodes"] == 10 and 0.0 <= record["mean"] <= 1.0 and record["ci95"] >= 0.0


def test_meta_training_improves_classification_accuracy(tmp_path, capsys):
    out = tmp_path / "learn"
    args = ["--dataset", "synthetic", "--width", "16", "--meta-batch", "8", "--no-progress", "--out", str(out)]
    assert main(["train", *args, "--iterations", "1", "--val-every", "0"]) == 0
    capsys.readouterr()
    main(["evaluate", str(out / "checkpoint.pt"), "--episodes", "200", "--json", str(tmp_path / "before.json")])
    assert main(["train", "--resume", "--out", str(out), "--iterations", "60", "--no-progress"]) == 0
    main(["evaluate", str(out / "checkpoint.pt"), "--episodes", "200", "--json", str(tmp_path / "after.json")])
    before = json.loads((tmp_path / "before.json").read_text())
    after = json.loads((tmp_path / "after.json").read_text())
    # 5-way 1-shot Gaussian tasks, 3 test-time steps; chance is 0.2
    assert after["mean"] > 0.6
    assert after["mean"] > before["mean"] + after["ci95"] + before["ci95"]


def test_errors_are_clear_and_exit_with_status_2(tmp_path, capsys):
    assert main(["train", "--dataset", "omniglot", "--data-root", str(tmp_path / "missing"), "--no-progress",
                 "--out", str(tmp_path / "o")]) == 2
    assert re.search(r"metafunc train: error: data root '.*missing' does not exist", capsys.readouterr().err)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert main(["evaluate", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt' is not a metafunc checkpoint" in capsys.readouterr().err
    assert main(["train", "--inner-lr", "-1", "--no-progress"]) == 2
    assert "metafunc train: error: inner_lr must be > 0 (got -1.0)" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--iterations", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", *SMALL, "--iterations", "2", "--width", "4", "--resume", "--out", str(out)]) == 2
    assert "is from another model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--algorithm", "nope"])


def test_bench_is_dispatched_lazily_with_a_clear_message_when_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "metafunc.cli.bench", None)  # import fails
    assert main(["bench", "--quick"]) == 2
    assert "metafunc bench: the benchmark module metafunc.cli.bench is not available" in capsys.readouterr().err
    seen = []
    fake = types.ModuleType("metafunc.cli.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "metafunc.cli.bench", fake)
    assert main(["bench", "--quick", "--x", "1"]) == 0
    assert seen == [["--quick", "--x", "1"]]


def test_python_dash_m_metafunc_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "metafunc", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for flag in ("--algorithm", "--dataset", "--data-root", "--ways", "--shots", "--queries", "--meta-batch",
                 "--inner-steps", "--inner-lr", "--outer-lr", "--iterations", "--steps", "--device", "--seed", "--out",
                 "--config", "--resume"):
        assert flag in proc.stdout, flag


@pytest.mark.data
def test_omniglot_train_and_evaluate_on_the_real_data(data_root, tmp_path, capsys):
    out = tmp_path / "omni"
    rc = main(["train", "--dataset", "omniglot", "--data-root", str(data_root / "omniglot"), "--width", "8",
               "--meta-batch", "2", "--iterations", "2", "--val-episodes", "2", "--queries", "2", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    capsys.readouterr()
    assert main(["evaluate", str(out / "checkpoint.pt"), "--episodes", "4", "--meta-batch", "2"]) == 0
    text = capsys.readouterr().out
    assert "5-way 1-shot, 2 queries per class, 3 inner steps (lr 0.4), 4 test episodes" in text
    assert "BatchNorm protocol: transductive" in text
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["params"]["features.0.0.weight"].shape == torch.Size([8, 1, 3, 3])


@pytest.mark.parametrize("algorithm", [n for n, s in __import__("metafunc").LEARNERS.items() if s.needs_head])
def test_a_5_way_checkpoint_with_an_output_layer_evaluates_8_way_with_a_zero_initialised_head(algorithm, tmp_path,
                                                                                              capsys):
    out = tmp_path / algorithm
    assert main(["train", "--dataset", "synthetic", "--algorithm", algorithm, "--iterations", "30", "--width", "16",
                 "--val-every", "0", "--val-episodes", "4", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out / "checkpoint.pt"), "--ways", "8", "--episodes", "40", "--no-progress",
                 "--json", str(out / "evaluation.json")]) == 0
    text = capsys.readouterr().out
    assert "8-way 1-shot" in text
    assert "the 5-way checkpoint's head is replaced by a zero-initialised 8-way head, adapted in the inner loop" in text
    if algorithm == "boil":   # BOIL's inner loop leaves the head alone: every parameter adapts, and it says so
        assert "(BOIL adapts only the body, so here every parameter adapts, as in MAML)" in text
    result = json.loads((out / "evaluation.json").read_text())
    assert result["ways"] == 8 and result["trained_ways"] == 5
    assert result["mean"] > 2 / 8, result                    # chance is 1/8: the new head really adapts
    if algorithm in ("boil", "maml"):   # the prototype-initialised head, named
        assert main(["evaluate", str(out / "checkpoint.pt"), "--ways", "8", "--episodes", "40", "--no-progress",
                     "--new-head", "prototypes", "--json", str(out / "other.json")]) == 0
        other = json.loads((out / "other.json").read_text())
        assert other["mean"] > 2 / 8 and "initialised from the support prototypes" in other["output_layer"]
    elif algorithm in ("meta_sgd", "maml_plus_plus"):
        capsys.readouterr()
        assert main(["evaluate", str(out / "checkpoint.pt"), "--ways", "8", "--new-head", "prototypes"]) == 2
        assert (f"new_head='prototypes' is offered for maml, fomaml, anil, boil (got algorithm '{algorithm}'); "
                "use new_head='zero'") in capsys.readouterr().err
