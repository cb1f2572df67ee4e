"""docs/your-own-model.md runs: its Python blocks in order (a CNN with BatchNorm on the user's own episodes, trained
with a hand-written loop and with ``fit``, tested with a CI), then its command line with the page's own modules."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

from metafunc.cli import main

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "your-own-model.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_the_guide_trains_a_users_cnn_on_a_users_episodes_from_python(capsys):
    namespace: dict = {}
    for code in _blocks("python"):
        if code.startswith("# my_"):
            continue   # the modules of the command-line section
        exec(compile(code, str(GUIDE), "exec"), namespace)
    said = capsys.readouterr().out
    assert "['head.weight', 'head.bias']" in said
    val = [r["accuracy"] for r in namespace["state"].records if r["split"] == "val"]
    assert len(val) == 2 and val[-1] > 0.5            # 5-way: chance is 0.2
    result = namespace["result"]
    assert result.episodes == 200 and result.mean > 0.5 and result.ci95 < 0.1
    assert namespace["state"].checkpoint[1] == 40 and (namespace["out"] / "metrics.jsonl").exists()


def test_the_guide_trains_its_own_modules_from_the_command_line(tmp_path, monkeypatch, capsys):
    for code in _blocks("python"):
        if code.startswith("# my_"):
            (tmp_path / code.splitlines()[0][2:].strip()).write_text(code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_models", "my_data"):    # another test may have imported modules of these names
        monkeypatch.delitem(sys.modules, name, raising=False)
    train_cmd, evaluate_cmd = [shlex.split(line) for line in _blocks("bash")[0].replace("\\\n", " ").splitlines()]
    argv = [a if a != "200" else "60" for a in train_cmd[1:]] + ["--no-progress", "--val-episodes", "50"]
    assert main(argv) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["split"] == "val" and records[-1]["accuracy"] > 0.5
    capsys.readouterr()
    assert main([*evaluate_cmd[1:3], "--episodes", "100", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "anil on my_data:episodes" in said and "BatchNorm protocol" in said
    accuracy = float(re.search(r"accuracy ([\d.]+)%", said).group(1))
    assert accuracy > 50.0


def test_a_dataset_factory_that_returns_something_else_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad_data.py").write_text("def episodes(*, ways):\n    return [1, 2, 3]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", "--dataset", "bad_data:episodes", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "must return a task source" in capsys.readouterr().err
    assert main(["train", "--dataset", "bad_data:nothing", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "has no attribute 'nothing'" in capsys.readouterr().err
