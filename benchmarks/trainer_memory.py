"""Peak memory of one ``metafunc train`` meta-step on Omniglot, before and after the trainer took the default step.

Before the redesign the trainer ran ``meta_batch(learner.meta_loss)(params, tasks)[0].backward()``, which keeps every
task's graph alive until the single backward pass; it now takes :func:`metafunc.train.trainer_step`
(``meta_value_and_grad``: each task differentiated as soon as it has run, two at a time on a CPU). Both are measured
side by side in one run, each in a fresh subprocess, on the same real 5-way 1-shot episodes (Conv-4, width 64, 15
queries per class, second-order MAML): the peak RSS of one meta-step (``VmHWM`` reset after a warm-up step) above
the RSS before it. The two meta-gradients are compared too.

    python benchmarks/trainer_memory.py --data-root ../shared/data/omniglot --meta-batch 4 16 32
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys

import torch

WAYS, SHOTS, QUERIES, WIDTH = 5, 1, 15, 64


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _worker(path: str, meta_batch: int, data_root: str) -> dict:
    from metafunc import apply_grads
    from metafunc import meta_batch as batch
    from metafunc.train import TrainConfig, build_experiment, resolve_config, trainer_step

    cfg = resolve_config(TrainConfig(dataset="omniglot", data_root=data_root, meta_batch=meta_batch, width=WIDTH,
                                     ways=WAYS, shots=SHOTS, queries=QUERIES))
    exp = build_experiment(cfg)
    params = exp.params
    tasks = exp.sources["train"].sample(meta_batch, torch.Generator().manual_seed(0))
    if path == "before":
        loss_fn = batch(exp.learner, mode=cfg.mode)

        def step() -> dict:
            for p in params.values():
                p.grad = None
            loss, _ = loss_fn(params, tasks)
            loss.backward()
            return {k: v.grad for k, v in params.items()}
    else:
        meta_step = trainer_step(exp, cfg)

        def step() -> dict:
            for p in params.values():
                p.grad = None
            _, _, grads = meta_step(params, tasks)
            apply_grads(params, grads)
            return grads

    step()  # warm-up: the allocator and the kernels' workspaces
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    grads = step()
    peak = _peak_rss() - before
    torch.save({k: g.detach().double() for k, g in grads.items()}, f"/tmp/trainer_memory_{path}_{meta_batch}.pt")
    return {"path": path, "meta_batch": meta_batch, "peak_bytes": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.path.join(os.environ.get("METAFUNC_DATA", "../shared/data"),
                                                            "omniglot"))
    parser.add_argument("--meta-batch", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker[0], int(args.worker[1]), args.worker[2])))
        return 0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    print(f"metafunc train's meta-step, Omniglot 5-way 1-shot, 15 queries, Conv-4 width {WIDTH}, second-order MAML, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs; peak RSS of one step above the RSS before it")
    print("| meta-batch | before: meta_batch + backward (MiB) | after: trainer_step (MiB) | after / before | "
          "meta-gradient rel. error |")
    print("|---|---|---|---|---|")
    rows = []
    for n in args.meta_batch:
        out = {}
        for path in ("before", "after"):
            done = subprocess.run([sys.executable, __file__, "--worker", path, str(n), args.data_root], env=env,
                                  capture_output=True, text=True, check=True)
            out[path] = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]
        a = torch.load(f"/tmp/trainer_memory_before_{n}.pt", weights_only=True)
        b = torch.load(f"/tmp/trainer_memory_after_{n}.pt", weights_only=True)
        num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
        den = sum(float(a[k].norm() ** 2) for k in a) ** 0.5
        rows.append({"meta_batch": n, **out, "relative_error": num / den})
        print(f"| {n} | {out['before'] / 2**20:.0f} | {out['after'] / 2**20:.0f} | {out['after'] / out['before']:.2f} |"
              f" {num / den:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
