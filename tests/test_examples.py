"""The examples run for a couple of steps, and the from-scratch MAML agrees with metafunc's meta-gradient."""

import importlib.util
import re
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_maml_from_scratch_meta_gradient_matches_metafunc(capsys):
    example = _load("maml_from_scratch")
    previous = torch.get_default_dtype()
    try:
        result = example.main(["--steps", "2", "--eval-tasks", "20", "--meta-batch", "4"])
    finally:
        torch.set_default_dtype(previous)
    text = capsys.readouterr().out
    assert result["meta_gradient_error"] < 1e-10
    assert result["first_order_error"] < 1e-10
    assert result["first_vs_second_order"] > 1e-3  # the Hessian term is really there
    reported = float(re.search(r"vs metafunc\.maml: relative error ([0-9.e+-]+)", text).group(1))
    assert reported == result["meta_gradient_error"] or abs(reported - result["meta_gradient_error"]) < 1e-12
    for row in ("random init", "joint training", "first-order MAML", "second-order MAML"):
        assert re.search(rf"{row}\s+0\.\d{{3}}\s+0\.\d{{3}}\s+0\.\d{{3}}", text), row
        assert 0.0 <= result[f"{row} / 1"] <= 1.0
