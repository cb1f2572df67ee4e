"""``benchmarks/omniglot_table.py`` runs end to end at a smoke budget (2 s per learner, 10 episodes): it trains by
time budget, chooses the test-time inner steps on validation, tests 5w1s, 5w5s and 20w1s (a zero-initialised
20-way head for MAML), and writes the table, the JSON and the plot. The numbers themselves mean nothing here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import omniglot_table
import pytest


@pytest.mark.slow
@pytest.mark.data
def test_the_table_script_runs_end_to_end_at_a_smoke_budget(tmp_path):
    data = os.environ.get("METAFUNC_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    if not Path(data, "omniglot").is_dir():
        if os.environ.get("CI"):
            pytest.fail("METAFUNC_DATA is not set to the shared data folder; .ci/run sets it")
        pytest.skip("real data not found: set METAFUNC_DATA")
    out = tmp_path / "table"
    assert omniglot_table.main(["--budget", "2", "--learners", "maml", "protonet", "matching_net_t1", "boil",
                                "--episodes", "10",
                                "--val-episodes", "10", "--step-choices", "1", "3", "--data-root",
                                str(Path(data, "omniglot")), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["learner"] for r in rows] == ["maml", "protonet", "matching_net_t1", "boil"]
    maml, protonet, variant, boil = rows
    # a variant row is another setting of a registered learner: trained as --algorithm matching_net, temperature 1
    assert variant["config"]["algorithm"] == "matching_net" and variant["config"]["options"] == {}
    assert variant["test_inner_steps"] is None
    assert maml["test_inner_steps"] in (1, 3) and set(maml["validation_5w1s"]) == {"1", "3"}
    assert protonet["test_inner_steps"] is None                      # no inner loop to choose
    # BOIL's 20-way output layer is chosen on 20-way validation episodes, and the test uses the choice
    assert set(boil["validation_20w1s"]) == {"zero", "prototypes"} and maml["new_head_20w"] is None
    chosen = max(boil["validation_20w1s"], key=boil["validation_20w1s"].get)
    assert boil["new_head_20w"] == chosen
    note = boil["tests"]["20w1s"]["output_layer"]
    assert ("support prototypes" in note) == (chosen == "prototypes") and ("zero-initialised" in note) == (chosen == "zero")
    for r in rows:
        assert r["config"]["time_budget"] == 2.0 and r["iterations"] >= 1
        assert set(r["tests"]) == {"5w1s", "5w5s", "20w1s"}
        assert all(0.0 <= t["mean"] <= 1.0 and t["episodes"] == 10 for t in r["tests"].values())
    assert maml["tests"]["20w1s"]["ways"] == 20 and "zero-initialised 20-way head" in maml["tests"]["20w1s"]["output_layer"]
    table = (out / "table.md").read_text()
    assert "every learner trained for 2 s of meta-steps" in table and "| maml |" in table and "| protonet |" in table
    assert (out / "validation_vs_time.png").read_bytes()[:4] == b"\x89PNG"

    # A second invocation with the same OUT reuses the rows instead of retraining; other settings are refused.
    stamp = (out / "maml" / "checkpoint.pt").stat().st_mtime_ns
    assert omniglot_table.main(["--budget", "2", "--learners", "protonet", "maml", "--episodes", "10",
                                "--data-root", str(Path(data, "omniglot")), "--out", str(out)]) == 0
    assert (out / "maml" / "checkpoint.pt").stat().st_mtime_ns == stamp
    again = json.loads((out / "results.json").read_text())
    assert [r["learner"] for r in again] == ["protonet", "maml"] and again[1]["tests"] == maml["tests"]
    with pytest.raises(RuntimeError, match=r"omniglot_table: .*maml/row.json was made with other settings .*"
                                           r"budget 2.0\); delete .* to rerun maml"):
        omniglot_table.main(["--budget", "3", "--learners", "maml", "--data-root", str(Path(data, "omniglot")),
                             "--out", str(out)])


def test_the_default_rows_are_one_chosen_setting_of_every_learner_in_the_readme_table():
    """Without ``--learners`` the script runs the README's table: one row per learner, each a known setting."""
    algorithms = [omniglot_table.VARIANTS.get(row, row) for row in omniglot_table.TABLE]
    assert sorted(algorithms) == sorted({"maml", "fomaml", "anil", "boil", "meta_sgd", "reptile", "imaml", "protonet",
                                         "matching_net", "proto_maml", "fo_proto_maml", "maml_plus_plus"})
    assert set(omniglot_table.TABLE) <= set(omniglot_table.SETTINGS)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "`python benchmarks/omniglot_table.py --budget 600`" in readme
