import json
import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """``$METAFUNC_DATA`` (the shared data folder); in CI a missing folder fails instead of skipping."""
    value = os.environ.get("METAFUNC_DATA")
    if value and Path(value).is_dir():
        return Path(value)
    guess = Path(__file__).resolve().parents[2] / "shared" / "data"
    if guess.is_dir():
        return guess
    if os.environ.get("CI"):
        pytest.fail("METAFUNC_DATA is not set to the shared data folder; .ci/run sets it")
    pytest.skip("real data not found: set METAFUNC_DATA to the shared data folder")


def _refuse_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def strict_json_lines(path: Path) -> list[dict]:
    """Every line of a JSONL file parsed by a strict reader (``NaN``/``Infinity`` are refused, as by ``jq``)."""
    return [json.loads(line, parse_constant=_refuse_constant) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session", autouse=True)
def _every_metrics_file_is_strict_json(tmp_path_factory):
    """After the whole suite: every ``metrics.jsonl``, ``config.json`` and results file that metafunc wrote under
    pytest's temporary folders parses with a strict JSON reader."""
    yield
    base = tmp_path_factory.getbasetemp()
    bad = []
    written = ("metrics.jsonl", "config.json", "sinusoid_results.json", "results.json", "evaluation.json")
    for path in [p for name in written for p in base.rglob(name) if p.is_file()]:
        try:
            if path.suffix == ".jsonl":
                strict_json_lines(path)
            else:
                json.loads(path.read_text(), parse_constant=_refuse_constant)
        except ValueError as e:
            bad.append(f"{path}: {e}")
    assert not bad, bad
