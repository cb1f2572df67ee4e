"""What each CPU loop-path optimisation changed: one second-order MAML meta-step (Conv-4 BN, 28x28, 5-way 1-shot,
15 queries, one inner step), the same tasks, variants alternating in each round, medians reported.

* ``func.grad + elementary BN``: the loop path before the fast-path work (``torch.func.grad`` inner gradients,
  BatchNorm from mean/var/rsqrt ops);
* ``autograd.grad + elementary BN``: inner gradients with ``torch.autograd.grad(create_graph=True)``;
* ``autograd.grad + fused BN``: and torch's fused batch_norm kernel (metafunc's loop path now);
* each with the whole meta-batch's graph kept until one backward, as ``meta_batch(...)[0].backward()`` does.

    python benchmarks/ablation_loop.py --meta-batch 4 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import conv4, make_tasks  # noqa: E402

import metafunc  # noqa: E402
from metafunc.nn.norm import BatchNorm, _normalize  # noqa: E402

__all__ = ["main"]


class ElementaryBatchNorm(BatchNorm):
    """metafunc's BatchNorm, always from elementary ops (its path inside torch.func transforms)."""

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = _normalize(x, [0] + list(range(2, x.dim())), self.eps)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)


def _elementary(module):
    module = copy.deepcopy(module)
    for block in module.features:
        old = block[1]
        block[1] = ElementaryBatchNorm(old.num_features)
        block[1].load_state_dict(old.state_dict())
    return module


def _step(module, tasks, use_func_grad):
    model, params = metafunc.functionalize(module)
    names = list(params)

    def step():
        total = 0.0
        for i in range(tasks.num_tasks):
            sx, sy, qx, qy = (t[i] for t in tasks)
            if use_func_grad:
                grads = torch.func.grad(lambda p: F.cross_entropy(model(p, sx), sy))(params)
            else:
                loss = F.cross_entropy(model(params, sx), sy)
                grads = dict(zip(names, torch.autograd.grad(loss, list(params.values()), create_graph=True)))
            fast = {k: params[k] - 0.4 * grads[k] for k in names}
            total = total + F.cross_entropy(model(fast, qx), qy)
        torch.autograd.grad(total / tasks.num_tasks, list(params.values()))

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = conv4()
    tasks = make_tasks(args.meta_batch)
    variants = {
        "func.grad + elementary BN": _step(_elementary(module), tasks, True),
        "autograd.grad + elementary BN": _step(_elementary(module), tasks, False),
        "autograd.grad + fused BN": _step(module, tasks, False),
    }
    times = {k: [] for k in variants}
    for r in range(args.rounds + 1):
        for name in (list(variants) if r % 2 else list(reversed(variants))):
            start = time.perf_counter()
            variants[name]()
            if r:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["func.grad + elementary BN"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, meta-batch {args.meta_batch}, "
          f"{args.rounds} rounds")
    print("| loop variant | median s | x before |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {statistics.median(ts) / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
