"""pytest-benchmark: one second-order MAML meta-step, metafunc's default against a plain autograd loop and the peers.

Conv-4 (BatchNorm) on 28x28, 5-way 1-shot, 15 queries, 4 tasks. Every benchmark first checks its meta-gradient
against the plain loop (float32 here, relative error < 1e-5; the float64 < 1e-10 check is in ``peers.py`` and
``tests/test_fast_paths.py``), so what is timed is what is verified. The width is reduced with
``METAFUNC_BENCH_WIDTH`` (default 64); ``METAFUNC_BENCH_COMPILED=1`` adds ``compiled_meta_step`` (compiled, and
checked against eager, before it is timed). parallel-metalearn, whose Conv-4 is rebuilt from its own layers, has its
float64 meta-gradient checked at width 8 instead (``test_parallel_metalearn_float64_meta_gradient``).

    python -m pytest benchmarks/test_meta_step.py --benchmark-only --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import build_step, check_gradients, conv4, load, make_tasks  # noqa: E402

from metafunc.core.tree import tree_relative_error  # noqa: E402

WIDTH = int(os.environ.get("METAFUNC_BENCH_WIDTH", "64"))
# Not parallel_metalearn: its float32 meta-gradient is 2.7e-5 from the plain loop's at width 64 (the loop's own float32
# error against float64 is 1.4e-6): its BatchNorm divides by sqrt(var + eps), which rounds worse under its vmap than in
# a loop (rsqrt: 4e-6). In float64 it is exact (1e-14), checked below.
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
    # float32: kernels of another layout (the channels-last plans) sum in another order; exactness is the float64
    # check of peers.py (check_gradients, < 1e-10) and of the test below
    assert tree_relative_error(step(), reference) < 1e-4
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("config", ["maml2-1", "maml1-1", "maml2-5"])
def test_parallel_metalearn_float64_meta_gradient(config):
    """Its vmap MAML on the Conv-4 rebuilt from its layers (its BatchNorm) equals the plain loop's meta-gradient in
    float64, as ``peers.py`` requires before timing it. Not a project dependency: skipped when not installed."""
    lib = load("parallel_metalearn")
    if not lib.AVAILABLE:
        pytest.skip(f"parallel_metalearn: {lib.WHY}")
    errors = check_gradients(config, ("parallel_metalearn",), device="cpu", width=8)
    assert errors["parallel_metalearn"] < 1e-10


def test_channels_last_variants_float64_meta_gradient():
    """metafunc's channels-last loop (issue 23: each task's images and convolution weights in channels-last memory
    format, two tasks at a time and one, and two started together as before their starts were spread) computes the
    plain loop's float64 meta-gradient: a layout that changed the values would not be a speed-up worth timing."""
    variants = ("metafunc:channels_last", "metafunc:workers1-channels_last", "metafunc:together-channels_last")
    errors = check_gradients("maml2-1", variants, device="cpu", width=8)
    assert set(errors) == set(variants)
    assert all(e is not None and e < 1e-10 for e in errors.values()), errors
