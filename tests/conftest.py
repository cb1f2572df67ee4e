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
