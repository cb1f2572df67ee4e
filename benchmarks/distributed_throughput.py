"""Throughput (tasks per second) of sharded MAML meta-steps with 1 and 2 processes, and the scaling efficiency.

Each configuration is launched with ``torchrun`` (gloo on CPU, NCCL on GPUs); every rank times ``--steps`` meta-steps
after ``--warmup`` steps, between two barriers, and rank 0 reports ``meta_batch * steps / seconds``. Before timing,
the meta-gradient of N processes is checked against the 1-process one (same tasks, same initial weights; the
relative error is printed, float32 rounding only). Scaling efficiency = throughput(N processes) / (N * throughput(1 process, same threads per
process)).

    python benchmarks/distributed_throughput.py                    # CPU: 1 and 2 processes, 1 thread each
    python benchmarks/distributed_throughput.py --device cuda --nprocs 1 2 4    # GPUs of one machine (NCCL)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]


def _worker(args: argparse.Namespace) -> None:
    import torch

    from metafunc import apply_grads, functionalize, maml, meta_value_and_grad, models
    from metafunc import distributed as D
    from metafunc.train import GaussianClassification

    torch.set_num_threads(args.threads)
    info = D.init_distributed(timeout=120, device=args.device)
    device = info.device
    torch.manual_seed(0)
    module = models.conv4(ways=args.ways, width=args.width, image_size=28, norm="batch").to(device)
    model, params = functionalize(module)
    learner = maml(model, inner_lr=0.4, steps=1)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    images = GaussianClassification(args.ways, 1, 5, dim=28 * 28)

    def sampler(n: int, generator: torch.Generator):
        t = images.sample(n, generator)
        shape = (n, -1, 1, 28, 28)
        return type(t)(t.support_x.reshape(shape), t.support_y, t.query_x.reshape(shape), t.query_y)

    source = D.ShardedSource(sampler, rank=info.rank, world_size=info.world_size)
    generator = torch.Generator(device=device).manual_seed(0)
    meta_step = D.sharded(meta_value_and_grad(learner))

    def step() -> None:
        tasks = source.sample(args.meta_batch, generator)
        apply_grads(params, meta_step(params, tasks)[2])
        optimizer.step()

    tasks = source.sample(args.meta_batch, torch.Generator(device=device).manual_seed(1))
    first_grad = {k: g.detach().cpu().clone()                # checked against 1 process before timing
                  for k, g in meta_step(params, tasks)[2].items()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        D.barrier()

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    if info.is_main:
        result = {"world_size": info.world_size, "threads": args.threads, "seconds": seconds,
                  "tasks_per_s": args.meta_batch * args.steps / seconds, "backend": info.backend,
                  "device": str(device)}
        torch.save(first_grad, Path(args.out) / f"grad{info.world_size}.pt")
        (Path(args.out) / f"result{info.world_size}_{args.threads}.json").write_text(json.dumps(result))
    D.shutdown_distributed()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nprocs: int, threads: int, args: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(HERE), "--worker", "--out", out, "--threads", str(threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--meta-batch", str(args.meta_batch),
           "--width", str(args.width), "--ways", str(args.ways), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads((Path(out) / f"result{nprocs}_{threads}.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table (``--worker`` is the per-rank entry point used by ``torchrun``).

    Example:
        >>> main(["--steps", "2", "--warmup", "1"])  # doctest: +SKIP
        0
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="process counts to measure (default 1 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--steps", type=int, default=20, help="timed meta-steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed meta-steps first (default 3)")
    p.add_argument("--meta-batch", type=int, default=16, help="tasks per meta-step, split over the ranks (16)")
    p.add_argument("--width", type=int, default=32, help="Conv-4 filters (default 32)")
    p.add_argument("--ways", type=int, default=5, help="classes per task (5-way 1-shot, 5 queries per class)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--repeats", type=int, default=1, help="measure each configuration this many times, keep the best")
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    import torch

    with tempfile.TemporaryDirectory() as out:
        rows = []
        for n in args.nprocs:
            best = max((_run(n, args.threads, args, out) for _ in range(args.repeats)),
                       key=lambda r: r["tasks_per_s"])
            rows.append(best)
        from metafunc.core.tree import tree_relative_error

        ref = torch.load(Path(out) / f"grad{args.nprocs[0]}.pt", weights_only=True)
        agree = {r["world_size"]: tree_relative_error(
            torch.load(Path(out) / f"grad{r['world_size']}.pt", weights_only=True), ref) for r in rows}
    one = rows[0]["tasks_per_s"] / rows[0]["world_size"]
    print(f"MAML (1 inner step), Conv-4 width {args.width} with BatchNorm, {args.ways}-way 1-shot 5-query 28x28 tasks, "
          f"meta-batch {args.meta_batch}; {args.steps} timed steps after {args.warmup} warm-up; "
          f"{args.threads} thread(s) per process; device {rows[0]['device']} ({rows[0]['backend'] or 'no process group'}); "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end")
    print(f"{'processes':>9} | {'tasks/s':>8} | {'speed-up':>8} | {'efficiency':>10} | {'meta-grad vs 1 proc':>20}")
    print("-" * 68)
    for r in rows:
        n = r["world_size"]
        print(f"{n:>9} | {r['tasks_per_s']:>8.1f} | {r['tasks_per_s'] / rows[0]['tasks_per_s']:>7.2f}x | "
              f"{r['tasks_per_s'] / (n * one):>9.0%} | {agree[n]:>20.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
