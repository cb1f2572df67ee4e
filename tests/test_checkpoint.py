"""Checkpoints: round trip, atomic writes that survive a crash mid-save, the previous generation kept as
``checkpoint.prev.pt`` (by ``save_checkpoint`` and by the trainer), and clear errors for wrong files."""

import os
import pickle

import pytest
import torch

from metafunc import functionalize, models
from metafunc.train.checkpoint import (
    CHECKPOINT_FORMAT,
    check_compatible,
    load_checkpoint,
    param_signature,
    previous_path,
    save_checkpoint,
)


def _state(scale=1.0):
    torch.manual_seed(0)
    _, params = functionalize(models.mlp(hidden=(4,)))
    params = {k: v.detach() * scale for k, v in params.items()}
    opt = torch.optim.Adam([p.clone().requires_grad_() for p in params.values()], lr=1e-3)
    return {"params": params, "optimizer": opt.state_dict(), "iteration": 5, "config": {"ways": 5},
            "rng": {"tasks": torch.Generator().manual_seed(3).get_state()}}


def test_round_trip_keeps_every_tensor_and_the_format_tag(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "sub" / "ckpt.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["format"] == CHECKPOINT_FORMAT
    assert loaded["iteration"] == 5 and loaded["config"] == {"ways": 5}
    assert all(torch.equal(loaded["params"][k], v) for k, v in state["params"].items())
    assert torch.equal(loaded["rng"]["tasks"], state["rng"]["tasks"])
    assert os.listdir(tmp_path / "sub") == ["ckpt.pt"]  # no temporary file left behind


def test_a_crash_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _state(1.0))

    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(100)  # half-written file, then the process "dies"
        raise KeyboardInterrupt("simulated crash during save")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _state(2.0))
    monkeypatch.setattr(torch, "save", real_save)
    loaded = load_checkpoint(path)
    expected = _state(1.0)["params"]
    assert all(torch.equal(loaded["params"][k], v) for k, v in expected.items())
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def _same_params(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_prev_holds_the_generation_before_the_last_save(tmp_path):
    path = tmp_path / "checkpoint.pt"
    states = [{**_state(scale), "iteration": it} for scale, it in ((1.0, 5), (2.0, 6), (3.0, 7), (4.0, 8))]
    assert not _same_params(states[0]["params"], states[1]["params"])
    save_checkpoint(path, states[0])
    assert not previous_path(path).exists()                    # nothing earlier to keep
    save_checkpoint(path, states[1])
    prev, now = load_checkpoint(previous_path(path)), load_checkpoint(path)
    assert (prev["iteration"], now["iteration"]) == (5, 6)
    assert _same_params(prev["params"], states[0]["params"]) and _same_params(now["params"], states[1]["params"])
    save_checkpoint(path, states[2])                           # one generation back, not the first forever
    prev, now = load_checkpoint(previous_path(path)), load_checkpoint(path)
    assert (prev["iteration"], now["iteration"]) == (6, 7)
    assert _same_params(prev["params"], states[1]["params"]) and _same_params(now["params"], states[2]["params"])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pt", "checkpoint.pt"]
    save_checkpoint(path, states[3], keep_previous=False)     # the previous generation is left as it was
    assert (load_checkpoint(previous_path(path))["iteration"], load_checkpoint(path)["iteration"]) == (6, 8)


def test_the_trainer_keeps_the_previous_iteration_in_checkpoint_prev(tmp_path):
    from metafunc.train import TrainConfig, train

    def run(iterations: int, out: str):
        train(TrainConfig(dataset="synthetic", iterations=iterations, width=8, meta_batch=2, checkpoint_every=1,
                          val_every=0, val_episodes=2, out=str(tmp_path / out), mode="loop"),  # one plan for both runs
              progress=False)
        path = tmp_path / out / "checkpoint.pt"
        return load_checkpoint(path), load_checkpoint(previous_path(path))

    now, prev = run(3, "three")
    two, two_prev = run(2, "two")                              # the same run stopped one iteration earlier
    assert (now["iteration"], prev["iteration"], two["iteration"], two_prev["iteration"]) == (3, 2, 2, 1)
    assert _same_params(prev["params"], two["params"])          # prev is iteration 2's state, exactly
    assert not _same_params(prev["params"], now["params"])
    assert torch.equal(prev["rng"]["tasks"], two["rng"]["tasks"])


def test_missing_file_is_a_file_not_found_error_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_checkpoint: no checkpoint at .*nope\.pt"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("content", [b"hello, not a checkpoint\n", b"", b"PK\x03\x04garbage"],
                         ids=["text", "empty", "broken-zip"])
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"load_checkpoint: .*bad\.pt' is not a metafunc checkpoint"):
        load_checkpoint(path)


def test_a_truncated_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not a metafunc checkpoint"):
        load_checkpoint(path)


def test_a_torch_file_without_the_format_tag_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"is a torch file but not a metafunc checkpoint .*keys \['weight'\]"):
        load_checkpoint(tmp_path / "plain.pt")


def test_a_pickled_object_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": CHECKPOINT_FORMAT, "x": Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="is not a metafunc checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_of_another_model_names_the_differences():
    ckpt = {"params": _state()["params"], "config": {"ways": 5}}
    _, other = functionalize(models.mlp(hidden=(6,)))
    with pytest.raises(ValueError, match=r"from another model \(shapes differ body\.0\.weight: checkpoint \[4, 1\] "
                                         r"vs model \[6, 1\]"):
        check_compatible(ckpt, other)
    _, conv = functionalize(models.conv4(ways=5, width=4))
    with pytest.raises(ValueError, match=r"from another model \(missing \['features"):
        check_compatible(ckpt, conv)


def test_checkpoint_of_another_configuration_names_the_setting():
    ckpt = {"params": _state()["params"], "config": {"ways": 5, "shots": 1}}
    check_compatible(ckpt, ckpt["params"], config={"ways": 5, "shots": 1}, keys=("ways", "shots"))
    with pytest.raises(ValueError, match=r"another configuration \(shots: checkpoint 1 vs now 5\)"):
        check_compatible(ckpt, ckpt["params"], config={"ways": 5, "shots": 5}, keys=("ways", "shots"))


def test_save_rejects_a_folder_and_a_non_dict(tmp_path):
    with pytest.raises(ValueError, match="save_checkpoint: path .* is a folder"):
        save_checkpoint(tmp_path, {"a": 1})
    with pytest.raises(TypeError, match="save_checkpoint: state must be a dict"):
        save_checkpoint(tmp_path / "x.pt", [1, 2])


def test_param_signature():
    assert param_signature({"w": torch.zeros(2, 3)}) == {"w": [2, 3]}
