"""Speed of the ``metafunc train`` main job's meta-step (MAML, sinusoid, 40-40 MLP, K=10, meta-batch 25).

Times the exact step the training loop runs (:func:`metafunc.train.trainer_step`, i.e. ``meta_value_and_grad``, + Adam) with the meta-batch as
``vmap`` (1 and 2 torch threads) and as a Python loop (1 thread), side by side in one run, after checking that both modes
give the same meta-gradient. Prints a table (milliseconds per meta-step, median of repeats).

Run: ``python benchmarks/train_speed.py --steps 50``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metafunc import apply_grads, meta_value_and_grad
from metafunc.core.tree import tree_relative_error
from metafunc.train import SinusoidSource, TrainConfig, build_experiment, resolve_config

__all__ = ["main"]


def _time_steps(mode: str, threads: int, steps: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    cfg = resolve_config(TrainConfig())
    exp = build_experiment(cfg)
    params = exp.params
    opt = torch.optim.Adam(params.values(), lr=cfg.outer_lr)
    step = meta_value_and_grad(exp.learner, mode=mode)
    gen = torch.Generator().manual_seed(0)
    source = SinusoidSource(cfg.shots, cfg.queries)
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        for _ in range(steps):
            tasks = source.sample(cfg.meta_batch, gen)
            apply_grads(params, step(params, tasks)[2])
            opt.step()
        if r:  # the first repeat warms up
            times.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(times)


def _check_modes_agree() -> float:
    exp = build_experiment(resolve_config(TrainConfig()))
    tasks = SinusoidSource(10, 10).sample(25, torch.Generator().manual_seed(0))
    grads = {}
    for mode in ("vmap", "loop"):
        params = {k: v.detach().clone().requires_grad_(True) for k, v in exp.params.items()}
        grads[mode] = meta_value_and_grad(exp.learner, mode=mode)(params, tasks)[2]
    return tree_relative_error(grads["vmap"], grads["loop"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="meta-step time of the sinusoid main job")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    err = _check_modes_agree()
    assert err < 1e-5, f"vmap and loop meta-gradients differ (relative error {err})"
    print(f"vmap vs loop meta-gradient relative error: {err:.2e} (float32)")
    print(f"torch {torch.__version__}, {args.steps} meta-steps x {args.repeats} repeats, median ms per meta-step")
    print(f"{'mode':<8}{'threads':>8}{'ms/step':>10}")
    rows = {}
    for mode, threads in (("vmap", 1), ("vmap", 2), ("loop", 1)):
        rows[mode, threads] = _time_steps(mode, threads, args.steps, args.repeats)
        print(f"{mode:<8}{threads:>8}{rows[mode, threads]:>10.1f}")
    print(f"loop / vmap (1 thread): {rows['loop', 1] / rows['vmap', 1]:.1f}x; "
          f"vmap 2 threads / 1 thread: {rows['vmap', 2] / rows['vmap', 1]:.2f}x")


if __name__ == "__main__":
    main()
