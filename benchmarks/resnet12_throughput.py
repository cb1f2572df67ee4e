"""Throughput of a ProtoNet meta-step on ResNet-12 (64-160-320-640): 5-way 5-shot, 15 queries per class.

One meta-step is the default step ``metafunc.meta_value_and_grad`` (forward of the 100 support and query images,
backward) plus an Adam update, on one episode; the images are random tensors of the benchmarks' sizes (84x84 as
miniImageNet/tieredImageNet, 32x32 as CIFAR-FS/FC100), so data loading is not timed. Median of ``--repeats`` steps
after one warm-up step, with the peak RSS of the process.

    python benchmarks/resnet12_throughput.py --sizes 84 32 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

import metafunc as mf


def _episode(size: int, ways: int, shots: int, queries: int) -> mf.Task:
    g = torch.Generator().manual_seed(0)
    sy = torch.arange(ways).repeat_interleave(shots).unsqueeze(0)
    qy = torch.arange(ways).repeat_interleave(queries).unsqueeze(0)
    return mf.Task(torch.rand(1, ways * shots, 3, size, size, generator=g), sy,
                   torch.rand(1, ways * queries, 3, size, size, generator=g), qy)


def measure(size: int, *, ways: int = 5, shots: int = 5, queries: int = 15, repeats: int = 3) -> dict[str, float]:
    """Seconds per meta-step (median) and episodes per second of ProtoNet on ResNet-12 at ``size`` x ``size``."""
    torch.manual_seed(0)
    model, params = mf.functionalize(mf.resnet12(None))
    step = mf.meta_value_and_grad(mf.protonet(model, ways=ways))
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    tasks = _episode(size, ways, shots, queries)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss, _, grads = step(params, tasks)
        mf.apply_grads(params, grads)
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"size": size, "seconds": seconds, "episodes_per_s": 1 / seconds, "loss": float(loss)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[84, 32])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(f"ProtoNet on ResNet-12 (12,424,320 parameters), 5-way 5-shot 15 queries, one episode per meta-step; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    print("| image size | s / meta-step (median) | episodes / s | images / s |")
    print("|---|---|---|---|")
    for size in args.sizes:
        r = measure(size, repeats=args.repeats)
        print(f"| {size}x{size} | {r['seconds']:.2f} | {r['episodes_per_s']:.3f} | {100 * r['episodes_per_s']:.1f} |",
              flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the process: {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
