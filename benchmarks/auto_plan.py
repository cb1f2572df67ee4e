"""``mode="auto"`` against every candidate it chooses from, side by side, on four workloads (issue 23).

For each workload: the default step ``meta_value_and_grad(learner)`` is first run until it has chosen (its
measuring calls are real meta-steps, counted apart), then it and every candidate plan fixed by hand
(``mode``/``chunk_size``/``workers``/``channels_last``) are timed in alternating rounds on the same meta-batch; the
table gives the median seconds per meta-step of each and ``auto / best``. Workloads:

* ``readme``: the README's example, MAML on sinusoid, 40-40 MLP, 25 tasks, K = 10;
* ``conv4``: the Omniglot meta-step, second-order MAML, Conv-4 width 64 with BatchNorm, 5-way 1-shot, 15 queries
  per class, meta-batch 8;
* ``resnet12``: second-order MAML on ResNet-12 at 32x32, 5-way 1-shot, 5 queries per class, meta-batch 4;
* ``minilm``: ProtoMAML with MiniLM's top transformer layer adapted (transformers' BertModel in all-MiniLM-L6-v2's
  shape, random weights: the speed does not depend on them), over cached lower-layer states, 5-way 1-shot,
  5 queries, length 32, meta-batch 4.

    python benchmarks/auto_plan.py                      # all four, 5 rounds
    python benchmarks/auto_plan.py --workloads readme conv4 --rounds 9 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import metafunc as mf  # noqa: E402
from metafunc.step.plan import StepPlan  # noqa: E402

__all__ = ["WORKLOADS", "measure", "main"]


def _labels(meta_batch: int, ways: int, per_class: int) -> torch.Tensor:
    return torch.arange(ways).repeat_interleave(per_class).repeat(meta_batch, 1)


def _images(meta_batch: int, ways: int, shots: int, queries: int, shape: tuple[int, ...]) -> mf.Task:
    g = torch.Generator().manual_seed(0)
    return mf.Task(torch.randn(meta_batch, ways * shots, *shape, generator=g), _labels(meta_batch, ways, shots),
                   torch.randn(meta_batch, ways * queries, *shape, generator=g), _labels(meta_batch, ways, queries))


def _readme() -> tuple[Any, dict, mf.Task]:
    torch.manual_seed(0)
    model, params = mf.functionalize(mf.models.mlp(hidden=(40, 40)))
    tasks = mf.sinusoid_tasks(25, shots=10, generator=torch.Generator().manual_seed(0))
    return mf.maml(model, inner_lr=0.01, steps=1, loss="mse"), params, tasks


def _conv4() -> tuple[Any, dict, mf.Task]:
    torch.manual_seed(0)
    model, params = mf.functionalize(mf.models.conv4(ways=5, width=64, image_size=28))
    return mf.maml(model, inner_lr=0.4, steps=1), params, _images(8, 5, 1, 15, (1, 28, 28))


def _resnet12() -> tuple[Any, dict, mf.Task]:
    torch.manual_seed(0)
    model, params = mf.functionalize(mf.resnet12(5))
    return mf.maml(model, inner_lr=0.01, steps=1), params, _images(4, 5, 1, 5, (3, 32, 32))


def _minilm() -> tuple[Any, dict, mf.Task]:
    import transformers

    from metafunc.hf import TransformerEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536)
    encoder, params = mf.functionalize(TransformerEncoder(transformers.BertModel(config), top=1))
    g = torch.Generator().manual_seed(0)

    def states(n: int) -> torch.Tensor:
        return torch.cat([torch.randn(4, n, 32, 384, generator=g), torch.ones(4, n, 32, 1)], dim=-1)

    tasks = mf.Task(states(5), _labels(4, 5, 1), states(25), _labels(4, 5, 5))
    return mf.proto_maml(encoder, inner_lr=0.01, head_lr=0.1, steps=3), params, tasks


WORKLOADS: dict[str, Callable[[], tuple[Any, dict, mf.Task]]] = {
    "readme": _readme, "conv4": _conv4, "resnet12": _resnet12, "minilm": _minilm}
"""Workload name -> ``(learner, params, tasks)``."""


def _fixed(learner: Any, plan: StepPlan) -> Callable:
    return mf.meta_value_and_grad(learner, mode=plan.mode, chunk_size=plan.chunk_size,
                                  workers=plan.workers if plan.mode == "loop" else None,
                                  channels_last=plan.channels_last)


def measure(name: str, rounds: int) -> dict[str, Any]:
    """Seconds per meta-step of ``auto`` (once it has chosen) and of each candidate, medians of ``rounds``."""
    learner, params, tasks = WORKLOADS[name]()
    auto = mf.meta_value_and_grad(learner)
    start, calls = time.perf_counter(), 0
    while auto.planner.plan() is None:
        auto(params, tasks)
        calls += 1
    measuring = time.perf_counter() - start
    report = auto.planner.report()
    steps = {"auto": auto} | {str(p): _fixed(learner, p) for p in auto.planner.candidates()}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for round_ in range(rounds + 1):            # round 0 warms every fixed plan up
        for k, step in steps.items():
            t0 = time.perf_counter()
            step(params, tasks)
            if round_:
                times[k].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}
    best = min((k for k in median if k != "auto"), key=median.get)
    return {"workload": name, "chosen": report["chosen"], "measuring_calls": calls, "measuring_seconds": measuring,
            "skipped": report["skipped"], "seconds": median, "best": best,
            "auto_over_best": median["auto"] / median[best]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    print(f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.rounds} alternating rounds")
    print("| workload | auto chose | ms per step: auto | each candidate | auto / best |")
    print("|---|---|---|---|---|")
    results = []
    for name in args.workloads:
        r = measure(name, args.rounds)
        results.append(r)
        others = ", ".join(f"{k} {1000 * v:.1f}" for k, v in r["seconds"].items() if k != "auto")
        print(f"| {name} | {r['chosen']} | {1000 * r['seconds']['auto']:.1f} | {others} | "
              f"{r['auto_over_best']:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
