"""pytest-benchmark: the Omniglot data path (cold decode + cache, cached load, a 32 x 5-way 1-shot 15-query
meta-batch). Each benchmark checks its result before timing. Run: ``pytest benchmarks/test_data_speed.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from metafunc.data import load_omniglot, omniglot_samplers

__all__: list[str] = []


@pytest.fixture(scope="module")
def omniglot_root() -> Path:
    env = os.environ.get("METAFUNC_DATA")
    root = (Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data") / "omniglot"
    if not root.is_dir():
        pytest.skip("Omniglot zips not found: set METAFUNC_DATA")
    return root


def test_cold_load(benchmark, omniglot_root, tmp_path):
    counter = iter(range(1000))

    def cold():
        return load_omniglot(omniglot_root, cache_dir=tmp_path / f"c{next(counter)}")

    data = benchmark.pedantic(cold, rounds=2, iterations=1)
    assert data.images.shape == (4840, 28, 28) and data.num_classes == 242


def test_cached_load(benchmark, omniglot_root, tmp_path):
    first = load_omniglot(omniglot_root, cache_dir=tmp_path)
    data = benchmark(load_omniglot, omniglot_root, cache_dir=tmp_path)
    assert torch.equal(data.images, first.images)


@pytest.mark.parametrize("split", ["train", "test"])
def test_sample_meta_batch(benchmark, omniglot_root, tmp_path, split):
    torch.set_num_threads(1)
    sampler = omniglot_samplers(omniglot_root, ways=5, shots=1, queries=15, cache_dir=tmp_path)[split]
    g = torch.Generator().manual_seed(0)
    task = benchmark(sampler.sample, 32, g)
    assert task.support_x.shape == (32, 5, 1, 28, 28) and task.query_x.shape == (32, 75, 1, 28, 28)
    assert torch.equal(torch.bincount(task.query_y[0], minlength=5), torch.full((5,), 15))
