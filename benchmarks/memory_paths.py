"""Peak memory of checkpointed exact MAML against unrolled MAML on Conv-4, as the inner loop grows.

Each case runs in a fresh subprocess (see :mod:`metafunc.bench` for how peak memory is measured: CUDA allocator
peak on a GPU, peak RSS above a primed baseline on a CPU). Prints one table, with the memory ratio and the growth
of each path from the shortest to the longest loop, and the cosine similarity of the checkpointed meta-gradient
against the unrolled one (they are the same gradient).

    python benchmarks/memory_paths.py                      # Conv-4 (width 32), 5-way 1-shot, k = 10, 50, 100, 200
    python benchmarks/memory_paths.py --width 64 --meta-batch 4 --device cuda --plot memory.png
"""

from __future__ import annotations

import argparse
import json
import sys

from metafunc.bench import BenchConfig, plot_rows, run_bench

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the memory benchmark and print its table.

    Example:
        >>> main(["--steps", "2", "--width", "4", "--query", "1", "--memory", "none"])  # doctest: +SKIP
        0
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default="10,50,100,200")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--meta-batch", type=int, default=1)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--query", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory", default="auto")
    p.add_argument("--paths", default="exact,checkpointed")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    cfg = BenchConfig(model="conv4", width=args.width, paths=args.paths.split(","),
                      inner_steps=[int(k) for k in args.steps.split(",")], meta_batch=args.meta_batch, ways=args.ways,
                      shots=args.shots, query=args.query, device=args.device, memory=args.memory, repeats=args.repeats,
                      warmup=0)
    rows = run_bench(cfg)
    by = {(r["path"], r["steps"]): r for r in rows}
    print(f"Conv-4 (width {cfg.width}, 28x28), {cfg.ways}-way {cfg.shots}-shot, query {cfg.query}/class, "
          f"meta-batch {cfg.meta_batch}, device {cfg.device}; memory = peak of one meta-step above its baseline")
    print(f"{'k':>5}  {'exact MiB':>10}  {'checkpointed MiB':>16}  {'ratio':>7}  {'exact s':>8}  "
          f"{'checkpointed s':>14}  {'cos':>10}")
    for k in cfg.inner_steps:
        e, c = by.get(("exact", k)) or {}, by.get(("checkpointed", k)) or {}
        em, cm = e.get("peak_mib"), c.get("peak_mib")
        cells = [
            f"{em:.1f}" if em else (e.get("error") or "n/a"),
            f"{cm:.1f}" if cm else (c.get("error") or "n/a"),
            f"{em / cm:.1f}" if em and cm else "n/a",
            f"{e['median_s']:.2f}" if e.get("median_s") else "n/a",
            f"{c['median_s']:.2f}" if c.get("median_s") else "n/a",
            f"{c['cosine']:.8f}" if c.get("cosine") is not None else "n/a",
        ]
        print(f"{k:>5}  {cells[0]:>10}  {cells[1]:>16}  {cells[2]:>7}  {cells[3]:>8}  {cells[4]:>14}  {cells[5]:>10}")
    ks = cfg.inner_steps
    for path in cfg.paths:
        a, b = by.get((path, ks[0])), by.get((path, ks[-1]))
        if a and b and a.get("peak_mib") and b.get("peak_mib"):
            print(f"{path}: k x{ks[-1] / ks[0]:.0f} -> peak memory x{b['peak_mib'] / a['peak_mib']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg.__dict__, "rows": rows}, f, indent=2)
    if args.plot:
        plot_rows(rows, args.plot, f"Conv-4 width {cfg.width}, meta-batch {cfg.meta_batch}: exact vs checkpointed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
