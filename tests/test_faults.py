"""Fault injection with real processes and real signals: long runs lose nothing.

* kill -9 at random points of a loop of checkpoint saves: ``checkpoint.pt`` (and ``checkpoint.prev.pt``) always load;
* SIGTERM, SIGINT or SIGUSR1 mid-run: the run finishes its meta-step, writes a checkpoint and exits 75; ``--resume``
  then ends bit for bit where an uninterrupted run ends; under ``torchrun`` a signal to one rank stops both at the
  same step;
* a NaN at step N: exit status 3, the checkpoint of the last good step (< N) intact and finite; ``--on-nonfinite
  skip`` skips and logs such steps; the divergent command of issue 15 stops with a clear message;
* a full disk while saving (ENOSPC): exit status 4, the previous checkpoint intact, no temporary file left;
* NaN in a task is refused before any transform, with the task's index; ``metafunc evaluate`` refuses a checkpoint
  whose parameters are not finite; every ``metrics.jsonl`` line parses as strict JSON.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import strict_json_lines

import metafunc as mf
from metafunc.cli import main
from metafunc.train import (
    EXIT_CHECKPOINT,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    CheckpointError,
    NonFiniteError,
    TrainConfig,
    load_checkpoint,
    previous_path,
    save_checkpoint,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
SYNTHETIC = ["--dataset", "synthetic", "--width", "16", "--meta-batch", "4", "--val-every", "0", "--val-episodes", "4",
             "--no-progress", "--threads", "1", "--checkpoint-every", "100000", "--mode", "loop"]
# A fixed --mode: two independent runs are bit-identical only with the same plan, and --mode auto measures its plan
# (a resumed run keeps its own from the checkpoint: tests/test_training.py)


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metafunc", "train", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _train_records(out: Path) -> list[dict]:
    return [r for r in strict_json_lines(out / "metrics.jsonl") if r["split"] == "train"]


def _wait_for_iterations(out: Path, proc: subprocess.Popen, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out / "metrics.jsonl"
        if path.exists() and path.read_text().count('"split": "train"') >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    pytest.fail(f"the run did not reach iteration {n}")


# ---------------------------------------------------------------------------------------------------------------
# kill -9 during saves
# ---------------------------------------------------------------------------------------------------------------

_SAVER = """
import os, sys, torch
from metafunc.train import load_checkpoint, save_checkpoint
path = sys.argv[1]
params = {f"layer{i}": torch.randn(256, 256) for i in range(8)}          # about 2 MB a checkpoint
start = load_checkpoint(path)["iteration"] + 1 if os.path.exists(path) else 1   # numbers go on across trials
for i in range(start, start + 100000):
    params["layer0"].fill_(float(i))
    save_checkpoint(path, {"params": params, "iteration": i})
    print(i, flush=True)
"""


def test_kill_9_at_random_points_of_saving_never_leaves_a_checkpoint_that_does_not_load(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "checkpoint.pt"
    seen = set()
    for trial in range(20):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], env=ENV, stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()                                   # at least one complete save happened
        assert first.strip(), proc.communicate()
        time.sleep(rng.uniform(0.0, 0.25))                               # then die anywhere in a later save
        proc.kill()
        proc.wait()
        saved = load_checkpoint(path)                                    # never raises: always a complete file
        assert saved["params"]["layer0"][0, 0].item() == saved["iteration"]
        seen.add(saved["iteration"])
        if previous_path(path).exists():
            assert load_checkpoint(previous_path(path))["iteration"] <= saved["iteration"]  # = if killed between
        leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("checkpoint.pt", "checkpoint.prev.pt")]
        for name in leftovers:                                           # only the dead writer's temporary file
            assert name.startswith(".checkpoint.pt.") and name.endswith((".writing", ".prev")), leftovers
            (tmp_path / name).unlink()
    assert len(seen) > 5                                                 # the kills landed at many points


# ---------------------------------------------------------------------------------------------------------------
# stop signals
# ---------------------------------------------------------------------------------------------------------------

def test_sigterm_mid_run_checkpoints_at_that_step_and_resume_equals_an_uninterrupted_run(tmp_path):
    run, full = tmp_path / "interrupted", tmp_path / "full"
    proc = _cli(*SYNTHETIC, "--iterations", "300", "--out", str(run))
    other = _cli(*SYNTHETIC, "--iterations", "300", "--out", str(full))   # the uninterrupted run, meanwhile
    _wait_for_iterations(run, proc, 10)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err
    stopped = load_checkpoint(run / "checkpoint.pt")["iteration"]
    assert 10 <= stopped < 300
    assert f"stopped by SIGTERM after iteration {stopped} of 300" in err and "continue with --resume" in err, err
    assert [r["iteration"] for r in _train_records(run)] == list(range(1, stopped + 1))   # logs flushed, nothing lost
    resumed = _cli(*SYNTHETIC, "--iterations", "300", "--out", str(run), "--resume")
    for p in (resumed, other):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    a, b = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(full / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == 300
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in b["params"])              # bit for bit
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i in b["optimizer"]["state"])
    untimed = [[{k: v for k, v in r.items() if k != "train_seconds"} for r in _train_records(o)] for o in (run, full)]
    assert untimed[0] == untimed[1]                                   # the same losses, each iteration logged once


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1])
def test_sigint_and_slurms_sigusr1_stop_cleanly_too(tmp_path, sig):
    proc = _cli(*SYNTHETIC, "--iterations", "100000", "--out", str(tmp_path))
    _wait_for_iterations(tmp_path, proc, 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert f"stopped by {sig.name}" in err
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == _train_records(tmp_path)[-1]["iteration"]


def test_a_signal_to_one_torchrun_rank_stops_every_rank_at_the_same_step(tmp_path):
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "metafunc", "train",
                              *SYNTHETIC, "--iterations", "100000", "--out", str(tmp_path)],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_iterations(tmp_path, agent, 5)
    workers = _children(agent.pid)
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGTERM)                      # one rank only (the later-started one: rank 1)
    _, err = agent.communicate(timeout=90)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")["iteration"]
    assert saved >= 5 and f"stopped by another rank after iteration {saved}" in err, err   # rank 0 says it
    assert _train_records(tmp_path)[-1]["iteration"] == saved  # rank 0 stopped at the step rank 1 stopped at
    assert "exitcode  : 75" in err, err


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return sorted(out)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# non-finite values
# ---------------------------------------------------------------------------------------------------------------

def _nan_at(call: int, *, loss_too: bool = False):
    def wrap(step):
        count = {"n": 0}

        def run(params, tasks):
            loss, metrics, grads = step(params, tasks)
            count["n"] += 1
            if count["n"] == call:
                grads = {k: g * float("nan") for k, g in grads.items()}
                if loss_too:
                    loss = loss * float("nan")
            return loss, metrics, grads
        return run
    return wrap


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(dataset="synthetic", iterations=8, meta_batch=3, width=8, val_every=0, val_episodes=3,
                checkpoint_every=2, out=str(out), mode="loop")   # a fixed plan: compared with an independent run
    return TrainConfig(**{**base, **kw})


def test_a_nan_at_step_n_stops_the_run_and_keeps_the_last_good_step_finite_on_disk(tmp_path):
    with pytest.raises(NonFiniteError, match=r"the meta-gradient of .* is not finite at iteration 5; the step was not "
                                             r"applied and the run stopped\. The last good state \(iteration 4\) is in") as info:
        train(_cfg(tmp_path), progress=False, wrap_step=_nan_at(5))
    assert info.value.iteration == 5
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["iteration"] == 4 and all(bool(torch.isfinite(v).all()) for v in saved["params"].values())
    # the state saved at the stop continues exactly like the run that never saw the NaN
    resumed = train(_cfg(tmp_path), resume=True, progress=False)
    clean = train(_cfg(tmp_path / "clean"), progress=False)
    assert all(torch.equal(resumed.params[k], clean.params[k]) for k in clean.params)


def test_on_nonfinite_skip_skips_and_logs_each_step_up_to_the_limit(tmp_path):
    result = train(_cfg(tmp_path, on_nonfinite="skip"), progress=False, wrap_step=_nan_at(3, loss_too=True))
    [skipped] = [r for r in _train_records(tmp_path) if r.get("skipped")]
    assert skipped == {**skipped, "iteration": 3, "skipped": "nonfinite", "quantity": "meta-loss", "objective": None}
    assert result.records[-1]["iteration"] == 8
    assert all(bool(torch.isfinite(v).all()) for v in result.params.values())
    with pytest.raises(NonFiniteError, match=r"1 non-finite steps were skipped already \(--max-nonfinite 1\)"):
        def always(step):
            return lambda p, t: (lambda out: (out[0], out[1], {k: g * float("nan") for k, g in out[2].items()}))(
                step(p, t))
        train(_cfg(tmp_path / "limit", on_nonfinite="skip", max_nonfinite=1), progress=False, wrap_step=always)


def test_the_divergent_command_of_issue_15_stops_with_status_3_and_a_finite_checkpoint(tmp_path):
    out = tmp_path / "diverge"
    proc = subprocess.run([sys.executable, "-m", "metafunc", "train", "--inner-lr", "50", "--outer-lr", "10",
                           "--iterations", "60", "--no-baseline", "--no-progress", "--out", str(out)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_NONFINITE, proc.stderr
    assert "is not finite at iteration" in proc.stderr and "Lower --outer-lr or --inner-lr" in proc.stderr
    assert "test it with" not in proc.stdout
    saved = load_checkpoint(out / "checkpoint.pt")
    assert all(bool(torch.isfinite(v).all()) for v in saved["params"].values())
    strict_json_lines(out / "metrics.jsonl")


def test_evaluate_refuses_a_checkpoint_whose_parameters_are_not_finite(tmp_path, capsys):
    train(_cfg(tmp_path, iterations=2), progress=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    name = next(iter(ckpt["params"]))
    ckpt["params"][name] = ckpt["params"][name] * float("nan")
    torch.save(ckpt, tmp_path / "diverged.pt")                     # written by hand: save_checkpoint refuses it
    assert main(["evaluate", str(tmp_path / "diverged.pt"), "--episodes", "4", "--no-progress"]) == 2
    assert f"the checkpoint's parameters ['{name}'] are not finite" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"save_checkpoint: the parameters .* are not finite"):
        save_checkpoint(tmp_path / "checkpoint.pt", ckpt)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 2


@pytest.mark.parametrize("field", ["support_x", "query_x", "query_y"])
def test_nan_in_a_task_is_refused_by_meta_batch_and_the_step_with_the_task_index(field):
    model, params = mf.functionalize(mf.models.mlp(hidden=(8,)))
    learner = mf.maml(model, inner_lr=0.1, loss="mse")
    tasks = mf.sinusoid_tasks(4, shots=5, generator=torch.Generator().manual_seed(0))
    broken = getattr(tasks, field).clone()
    broken[2, 1] = float("nan")
    tasks = tasks._replace(**{field: broken})
    message = f"task 2 has NaN or inf in {field}; clean or drop that task (or pass validate=False"
    for fn in (mf.meta_batch(learner), mf.meta_value_and_grad(learner)):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            fn(params, tasks)
    loss, _ = mf.meta_batch(learner, validate=False)(params, tasks)   # the escape hatch trains on it
    assert not bool(torch.isfinite(loss))


# ---------------------------------------------------------------------------------------------------------------
# saving that cannot hurt
# ---------------------------------------------------------------------------------------------------------------

def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_exits_4(tmp_path, monkeypatch, capsys):
    from metafunc.train import checkpoint as checkpoint_module

    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".writing"):   # a checkpoint's data being written
            calls["n"] += 1
            if calls["n"] == 2:                              # the second checkpoint: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(checkpoint_module.os, "fsync", fsync)
    with pytest.raises(CheckpointError, match=r"writing .*checkpoint\.pt' failed: No space left on device \(errno 28\); "
                                              r"the previous checkpoint .* is intact"):
        train(_cfg(tmp_path / "lib"), progress=False)
    assert load_checkpoint(tmp_path / "lib" / "checkpoint.pt")["iteration"] == 2
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]

    calls["n"] = 0                                           # the same through the command: exit status 4
    code = main(["train", *SYNTHETIC[:-2], "--checkpoint-every", "2", "--iterations", "6", "--out",
                 str(tmp_path / "cli")])
    assert code == EXIT_CHECKPOINT
    assert "No space left on device" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "cli" / "checkpoint.pt")["iteration"] == 2


def test_a_checkpoint_that_does_not_read_back_is_not_renamed_over_the_good_one(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"params": {"w": torch.zeros(2)}, "iteration": 1})
    real_load = torch.load

    def corrupting_load(f, *args, **kwargs):
        data = real_load(f, *args, **kwargs)
        return {**data, "iteration": -1}

    monkeypatch.setattr(torch, "load", corrupting_load)
    with pytest.raises(CheckpointError, match="did not read back as the checkpoint just written"):
        save_checkpoint(path, {"params": {"w": torch.ones(2)}, "iteration": 2})
    monkeypatch.setattr(torch, "load", real_load)
    assert load_checkpoint(path)["iteration"] == 1
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == '["checkpoint.pt"]'
