"""Where one meta-step's time goes per op, in torch's default (NCHW) layout and in the channels-last loop (issue 23).

Second-order MAML (or ``--config``), Conv-4 width 64 with BatchNorm, 5-way 1-shot, 15 queries per class,
``--meta-batch`` tasks one at a time (``meta_value_and_grad(mode="loop", workers=1)``), on ``--threads`` threads.
Both layouts are timed side by side in alternating rounds (median wall seconds per meta-step), then one meta-step of
each runs under ``torch.profiler``: the table gives the self CPU milliseconds of the ops that take the most, in each
layout. Also printed: the plain ``torch.autograd`` loop of ``peers.py`` (NCHW) in the same rounds.

    python benchmarks/layout_profile.py --threads 1 --meta-batch 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peers import CONFIGS, INNER_LR, build_step, conv4, make_tasks  # noqa: E402

import metafunc as mf  # noqa: E402

__all__ = ["self_cpu_ms", "main"]


def self_cpu_ms(step, top: int) -> dict[str, float]:
    """Self CPU milliseconds per op name of one call of ``step``, the ``top`` largest."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
    rows["total"] = sum(rows.values())
    return dict(sorted(rows.items(), key=lambda kv: -kv[1])[:top + 1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="maml2-1", choices=[c for c in CONFIGS if c != "protonet"])
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module, tasks, cfg = conv4(64), make_tasks(args.meta_batch), CONFIGS[args.config]
    model, params = mf.functionalize(module)
    learner = mf.maml(model, inner_lr=INNER_LR, steps=cfg["steps"], first_order=cfg["first_order"])
    nchw, nhwc = (mf.meta_value_and_grad(learner, mode="loop", workers=1, channels_last=c) for c in (False, True))
    steps = {"NCHW": lambda: nchw(params, tasks), "channels-last": lambda: nhwc(params, tasks),
             "plain loop (NCHW)": build_step("plain", args.config, module, tasks)}
    seconds: dict[str, list[float]] = {k: [] for k in steps}
    for round_ in range(args.rounds + 1):
        for k in (list(steps) if round_ % 2 else list(reversed(steps))):
            start = time.perf_counter()
            steps[k]()
            if round_:
                seconds[k].append(time.perf_counter() - start)
    print(f"{args.config}, {args.meta_batch} tasks, {args.threads} thread(s), torch {torch.__version__}; "
          f"median of {args.rounds} alternating rounds, s per meta-step:")
    for k, v in seconds.items():
        print(f"  {k}: {statistics.median(v):.3f}")
    ops = {k: self_cpu_ms(steps[k], args.top) for k in ("NCHW", "channels-last")}
    names = list(dict.fromkeys([*ops["NCHW"], *ops["channels-last"]]))
    print("\n| op | NCHW self CPU ms | channels-last self CPU ms |\n|---|---|---|")
    for name in sorted(names, key=lambda n: -ops["NCHW"].get(n, 0.0)):
        cells = [f"{ops[k][name]:.1f}" if name in ops[k] else "-" for k in ("NCHW", "channels-last")]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
