"""Resident memory over one meta-step: one task at a time, two at a time spaced (the loop's schedule), two started
together (issue 23).

Second-order MAML, Conv-4 width 64 with BatchNorm, 28x28, 5-way 1-shot, 15 queries per class, channels-last loop
(``meta_value_and_grad(mode="loop", channels_last=True)``), ``--meta-batch`` random tasks. Each schedule runs in a
fresh subprocess: two warm-up steps, then one meta-step while a thread samples the resident set size every 2 ms
(above the RSS before the step, after ``malloc_trim``; run it with ``MALLOC_MMAP_THRESHOLD_=65536`` as
``peers.py --memory`` does, so that freed tensors leave the RSS). Prints each schedule's peak and time, and the
fraction of the step's time it spends above half its peak; ``--plot`` draws the curves.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/memory_timeline.py --steps 1 5 --plot timeline.png
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peer_impls.metafunc_impl import _NoSpacing  # noqa: E402
from peers import INNER_LR, _rss, conv4, make_tasks  # noqa: E402

import metafunc  # noqa: E402
from metafunc.step import default as fast  # noqa: E402

__all__ = ["SCHEDULES", "timeline", "main"]

SCHEDULES = {"one at a time": 1, "two, spaced": 2, "two, together": 2}


def timeline(steps: int, schedule: str, meta_batch: int) -> dict:
    """``{"seconds", "t", "mib"}``: one meta-step's duration and its RSS samples (seconds from its start, MiB)."""
    torch.manual_seed(0)
    model, params = metafunc.functionalize(conv4(64))
    tasks = make_tasks(meta_batch)
    if schedule == "two, together":
        fast._Spacing = _NoSpacing  # type: ignore[misc]
    step = fast.meta_value_and_grad(metafunc.maml(model, inner_lr=INNER_LR, steps=steps).meta_loss, mode="loop",
                                    workers=SCHEDULES[schedule], channels_last=True)
    for _ in range(2):
        step(params, tasks)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass
    before, samples, done = _rss(), [], threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), _rss()))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    step(params, tasks)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"seconds": seconds, "t": [round(t - start, 4) for t, _ in samples],
            "mib": [round((r - before) / 2**20, 2) for _, r in samples]}


def _time_above_half(run: dict) -> float:
    """The fraction of the step's time its RSS spent above half its peak (one task at a time: of each task's)."""
    t, mib = run["t"], run["mib"]
    half = max(mib) / 2
    above = sum(b - a for a, b, m in zip(t, t[1:], mib) if m > half)
    return above / (t[-1] - t[0]) if len(t) > 1 else 0.0


def _plot(runs: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 3.5), squeeze=False)
    for ax, (steps, by_schedule) in zip(axes[0], runs.items()):
        for schedule, run in by_schedule.items():
            ax.plot(run["t"], run["mib"], label=f"{schedule} (peak {max(run['mib']):.0f} MiB)", lw=1)
        ax.set_title(f"second-order MAML, {steps} inner step(s)")
        ax.set_xlabel("seconds into the meta-step")
        ax.set_ylabel("RSS above the start, MiB")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 5], help="inner steps")
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--json", default=None, help="write the samples here")
    parser.add_argument("--plot", default=None, help="draw the curves (PNG) here")
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(timeline(int(args.worker[0]), args.worker[1], args.meta_batch)))
        return 0
    runs: dict[int, dict[str, dict]] = {}
    for steps in args.steps:
        runs[steps] = {}
        for schedule in SCHEDULES:
            out = subprocess.run([sys.executable, __file__, "--meta-batch", str(args.meta_batch), "--worker",
                                  str(steps), schedule], capture_output=True, text=True, check=True,
                                 env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
            run = runs[steps][schedule] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{steps} inner step(s), {schedule}: peak {max(run['mib']):.0f} MiB, {run['seconds']:.3f} s, "
                  f"above half the peak for {_time_above_half(run):.2f} of the time")
    if args.json:
        Path(args.json).write_text(json.dumps(runs))
    if args.plot:
        _plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
