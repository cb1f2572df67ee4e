"""Where the time of one second-order MAML meta-step goes, and its arithmetic floor on this machine.

Conv-4 (64 filters, BatchNorm), 28x28, 5-way 1-shot, 15 queries per class, one inner step. Prints:

* the FLOPs of one meta-step per task, counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
  matrix products of the inner forward, inner backward with ``create_graph``, query forward and the outer backward,
  which holds the double backward);
* this machine's measured peak (a 2048x2048 float32 matmul, best of 5) and the floor = FLOPs / peak;
* the measured seconds of each phase (median over rounds, tasks in a loop as in metafunc's CPU path), the data
  sampling included.

    python benchmarks/profile_meta_step.py --meta-batch 4 --rounds 3 --threads 1
    python benchmarks/profile_meta_step.py --device cuda --meta-batch 32     # float32 peak of an 8192 matmul

On a GPU every phase boundary synchronises the device (the phases of one task are timed one after the other, as in
the loop; the vmapped default overlaps them), and the peak is that of float32 matmuls with TF32 off.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import conv4, make_tasks  # noqa: E402

__all__ = ["phase_flops", "matmul_peak", "phase_times", "main"]

PHASES = ("data", "inner forward", "inner backward (create_graph)", "query forward", "outer backward (double bwd)")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _phases(module, names, params, task, lr, record):
    sx, sy, qx, qy = task
    t = time.perf_counter()
    loss = F.cross_entropy(functional_call(module, dict(zip(names, params)), (sx,)), sy)
    record("inner forward", t)
    t = time.perf_counter()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    fast = [p - lr * g for p, g in zip(params, grads)]
    record("inner backward (create_graph)", t)
    t = time.perf_counter()
    query = F.cross_entropy(functional_call(module, dict(zip(names, fast)), (qx,)), qy)
    record("query forward", t)
    t = time.perf_counter()
    query.backward()
    record("outer backward (double bwd)", t)


def phase_flops(module, device: str = "cpu") -> dict[str, float]:
    """FLOPs of each phase for one task."""
    names = [k for k, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    task = tuple(t[0] for t in make_tasks(1, device=device))
    flops: dict[str, float] = {}
    counter = FlopCounterMode(display=False)

    def record(phase, _start):
        flops[phase] = counter.get_total_flops() - sum(flops.values())

    with counter:
        _phases(module, names, params, task, 0.4, record)
    return flops


def matmul_peak(n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Best FLOP/s of an n x n float32 matmul (TF32 off on a GPU)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / best


def phase_times(module, meta_batch: int, rounds: int, device: str = "cpu") -> dict[str, float]:
    """Median seconds per meta-step spent in each phase."""
    names = [k for k, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    per_round: list[dict[str, float]] = []
    for r in range(rounds + 1):
        spent = dict.fromkeys(PHASES, 0.0)

        def record(phase, start):
            _sync(device)
            spent[phase] += time.perf_counter() - start

        _sync(device)
        t = time.perf_counter()
        tasks = make_tasks(meta_batch, seed=r, device=device)
        record("data", t)
        for i in range(meta_batch):
            _phases(module, names, params, tuple(x[i] for x in tasks), 0.4, record)
        if r:
            per_round.append(spent)
    return {p: statistics.median(s[p] for s in per_round) for p in PHASES}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = conv4().to(args.device)
    flops = phase_flops(module, args.device)
    peak = matmul_peak(8192 if args.device.startswith("cuda") else 2048, device=args.device)
    times = phase_times(module, args.meta_batch, args.rounds, args.device)
    total_flops = sum(flops.values()) * args.meta_batch
    total_time = sum(times.values())
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {args.device} ({where}), meta-batch {args.meta_batch}")
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s")
    print("| phase | GFLOP per meta-step | measured s | share of time | achieved GFLOP/s |")
    print("|---|---|---|---|---|")
    for p in PHASES:
        f = flops.get(p, 0.0) * args.meta_batch
        print(f"| {p} | {f / 1e9:.3f} | {times[p]:.3f} | {times[p] / total_time:.0%} | "
              f"{(f / times[p] / 1e9) if times[p] else 0:.1f} |")
    print(f"| total | {total_flops / 1e9:.3f} | {total_time:.3f} | 100% | {total_flops / total_time / 1e9:.1f} |")
    print(f"arithmetic floor at the matmul peak: {total_flops / peak:.3f} s; measured / floor = "
          f"{total_time / (total_flops / peak):.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
