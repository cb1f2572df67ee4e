"""Meta-training throughput (tasks per second) of second-order MAML on Omniglot, Conv-4, 5-way 1-shot.

Real episodes from ``$METAFUNC_DATA/omniglot`` (the two "small" background splits), sampled on the device; the
meta-step is metafunc's default fast path, ``meta_value_and_grad(maml(...).meta_loss)`` (``mode="auto"``), then Adam.
Reports tasks/s over the timed steps (the first step is a warm-up), shows a tqdm bar with loss and accuracy, and
plots the query loss per step.

    python benchmarks/omniglot_throughput.py --steps 10 --meta-batch 4 --device cpu
    python benchmarks/omniglot_throughput.py --steps 8 --meta-batch 32 --workers auto 1   # side by side
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
    parser.add_argument("--workers", default=["auto"], nargs="+",
                        help="tasks at once on CPU threads: 'auto' (meta_value_and_grad's choice) or a number; "
                             "several settings are run side by side, alternating step by step on the same episodes")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    torch.manual_seed(0)
    sampler = omniglot_samplers(Path(args.data) / "omniglot", ways=5, shots=1, queries=15,
                                device=args.device)["train"]
    module = metafunc.nn.models.conv4(ways=5).to(args.device)
    runs = []
    for setting in args.workers:
        requested = None if setting == "auto" else int(setting)
        model, params = metafunc.functionalize(module)
        learner = metafunc.maml(model, inner_lr=0.4, steps=1)
        workers = metafunc.step.default.resolve_workers(learner.meta_loss, sampler.sample(args.meta_batch, torch.Generator()),
                                                mode="loop", workers=requested, params=params)
        runs.append(dict(setting=setting, workers=workers if args.device.startswith("cpu") else 1, params=params,
                         step=metafunc.meta_value_and_grad(learner.meta_loss, workers=requested),
                         optimizer=torch.optim.Adam(params.values(), lr=1e-3), times=[], losses=[]))
    generator = torch.Generator(device="cpu").manual_seed(0)
    with tqdm(range(args.steps), desc="omniglot maml", file=sys.stderr) as bar:
        for _ in bar:
            tasks = sampler.sample(args.meta_batch, generator)
            for run in runs:  # the same episodes for every setting, one after the other
                start = time.perf_counter()
                loss, metrics, grads = run["step"](run["params"], tasks)
                for k, p in run["params"].items():
                    p.grad = grads[k]
                run["optimizer"].step()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                run["times"].append(time.perf_counter() - start)
                run["losses"].append(float(loss))
            bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{float(metrics['accuracy']):.3f}")
    for run in runs:
        timed = run["times"][1:] or run["times"]  # the first step is a warm-up
        run["rate"] = args.meta_batch * len(timed) / sum(timed)
        print(f"device {args.device} ({torch.get_num_threads()} threads, workers={run['setting']}: "
              f"{run['workers']} task(s) at once), torch {torch.__version__}, meta-batch {args.meta_batch}: "
              f"{run['rate']:.2f} tasks/s ({sum(timed) / len(timed):.2f} s per meta-step, {len(timed)} timed steps, "
              f"sampling and Adam included)")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3))
        for run in runs:
            ax.plot(run["losses"], label=f"workers={run['setting']}: {run['rate']:.2f} tasks/s")
        ax.set_xlabel("meta-step")
        ax.set_ylabel("query loss")
        ax.set_title(f"MAML Omniglot 5-way 1-shot, meta-batch {args.meta_batch}, {args.device}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
