"""pytest-benchmark: one second-order MAML meta-step, metafunc's default against a plain autograd loop and the peers.

Conv-4 (BatchNorm) on 28x28, 5-way 1-shot, 15 queries, 4 tasks. Every benchmark first checks its meta-gradient
against the plain loop (float32 here, relative error < 1e-5; the float64 < 1e-10 check is in ``peers.py`` and
``tests/test_fast_paths.py``), so what is timed is what is verified. The width is reduced with
``METAFUNC_BENCH_WIDTH`` (default 64); ``METAFUNC_BENCH_COMPILED=1`` adds ``compiled_meta_step`` (compiled, and
checked against eager, before it is timed).

    python -m pytest benchmarks/test_meta_step.py --benchmark-only --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import build_step, conv4, load, make_tasks  # noqa: E402

from metafunc.core.tree import tree_relative_error  # noqa: E402

WIDTH = int(os.environ.get("METAFUNC_BENCH_WIDTH", "64"))
IMPLS = ["metafunc", "metafunc:workers1", "metafunc:meta_batch-auto", "plain", "higher", "learn2learn", "torchopt"]
if os.environ.get("METAFUNC_BENCH_COMPILED"):  # the first call compiles for minutes on a CPU
    IMPLS.append("metafunc:compiled")


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    module = conv4(WIDTH)
    tasks = make_tasks(4)
    return module, tasks, build_step("plain", "maml2-1", module, tasks)()


@pytest.mark.parametrize("impl", IMPLS)
def test_maml_second_order_meta_step(benchmark, case, impl):
    module, tasks, reference = case
    if not load(impl.partition(":")[0]).AVAILABLE:
        pytest.skip(f"{impl}: {load(impl.partition(':')[0]).WHY}")
    step = build_step(impl, "maml2-1", module, tasks)
    assert tree_relative_error(step(), reference) < 1e-5
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
