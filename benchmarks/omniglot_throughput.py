"""Meta-training throughput (tasks per second) of second-order MAML on Omniglot, Conv-4, 5-way 1-shot.

Real episodes from ``$METAFUNC_DATA/omniglot`` (the two "small" background splits), sampled on the device; the
meta-step is metafunc's default fast path, ``meta_value_and_grad(maml(...).meta_loss)`` (``mode="auto"``), then Adam.
Reports tasks/s over the timed steps (the first step is a warm-up), shows a tqdm bar with loss and accuracy, and
plots the query loss per step.

    python benchmarks/omniglot_throughput.py --steps 10 --meta-batch 4 --device cpu
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import metafunc  # noqa: E402
from metafunc.data.omniglot import omniglot_samplers  # noqa: E402

__all__ = ["main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("METAFUNC_DATA", str(Path(__file__).resolve().parents[2]
                                                                              / "shared" / "data")))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None,
                        help="tasks at once on CPU threads (default: meta_value_and_grad's choice)")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    torch.manual_seed(0)
    sampler = omniglot_samplers(Path(args.data) / "omniglot", ways=5, shots=1, queries=15,
                                device=args.device)["train"]
    model, params = metafunc.functionalize(metafunc.models.conv4(ways=5).to(args.device))
    learner = metafunc.maml(model, inner_lr=0.4, steps=1)
    step_fn = metafunc.meta_value_and_grad(learner.meta_loss, workers=args.workers)
    workers = metafunc.fast.resolve_workers(learner.meta_loss, sampler.sample(args.meta_batch, torch.Generator()),
                                            mode="loop", workers=args.workers, params=params)
    if not args.device.startswith("cpu"):
        workers = 1
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    generator = torch.Generator(device="cpu").manual_seed(0)
    losses, times = [], []
    with tqdm(range(args.steps), desc="omniglot maml", file=sys.stderr) as bar:
        for _ in bar:
            start = time.perf_counter()
            tasks = sampler.sample(args.meta_batch, generator)
            loss, metrics, grads = step_fn(params, tasks)
            for k, p in params.items():
                p.grad = grads[k]
            optimizer.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            losses.append(float(loss))
            bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{float(metrics['accuracy']):.3f}")
    timed = times[1:] or times
    rate = args.meta_batch * len(timed) / sum(timed)
    print(f"device {args.device} ({torch.get_num_threads()} threads, {workers} task(s) at once), "
          f"torch {torch.__version__}, meta-batch "
          f"{args.meta_batch}: {rate:.2f} tasks/s ({sum(timed) / len(timed):.2f} s per meta-step, "
          f"{len(timed)} timed steps, data sampling included)")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(losses)
        ax.set_xlabel("meta-step")
        ax.set_ylabel("query loss")
        ax.set_title(f"MAML Omniglot 5-way 1-shot, {rate:.2f} tasks/s on {args.device}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
