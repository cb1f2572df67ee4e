"""MAML learns 5-way 1-shot Omniglot on the real data (small background zips, Korean and Sanskrit held out).

A small budget (see ``BUDGET``) of second-order MAML, meta-batch under vmap, on a Conv-4 with metafunc's exact
BatchNorm; then 200 test episodes (3 inner steps) from the two held-out alphabets. Chance is 20%.

Threshold: 55% (``THRESHOLD``). Measured with this exact budget, seeds 0-3 (torch 2.13.0, 2-core CPU): 74.6%, 71.1%,
72.1%, 72.9% (each +- about 2.2 points, the 95% interval over its 200 episodes); mean 72.7%, spread 3.5 points,
about 39 s of CPU time per run. 55% is 16 points (7 intervals) below the worst seed and 35 points above chance, so
seed-to-seed and machine-to-machine noise does not trip it, while a broken data path (labels not matching images,
rotations leaking into the test split, inverted strokes) or a broken meta-gradient fails it. Shown, not assumed:
the same budget and seed with each training task's query labels permuted (the meta-gradient then points nowhere)
reaches 44.0% +- 1.8 (the inner loop alone still adapts a random Conv-4 above chance), 11 points below the threshold,
while the real run gave 71.8% +- 2.2 in the same measurement (2026-12-01, torch 2.13.0, 1 thread).

Run by hand to measure the spread: ``python tests/test_omniglot_training.py --seeds 0 1 2 3``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from metafunc import functionalize, maml, meta_batch, models, with_steps
from metafunc.data import EpisodeSampler, omniglot_samplers

BUDGET = dict(iterations=100, meta_batch=4, width=32, queries=5, inner_lr=0.4, outer_lr=3e-3, test_episodes=200)
THRESHOLD = 0.55


def train_and_test(samplers: dict[str, EpisodeSampler], *, seed: int, iterations: int, meta_batch_size: int,
                   width: int, inner_lr: float, outer_lr: float, test_episodes: int, test_steps: int = 3,
                   progress: bool = True, broken: bool = False) -> tuple[float, float]:
    """Meta-train MAML (1 inner step) on ``samplers["train"]``; mean test accuracy and 95% CI half-width.

    ``broken=True`` permutes each training task's query labels at random (the support set is untouched): the
    meta-gradient then carries no information about the task, as with a broken meta-gradient path."""
    torch.manual_seed(seed)
    ways = samplers["train"].ways
    model, params = functionalize(models.conv4(ways=ways, width=width, norm="batch"))
    learner = maml(model, inner_lr=inner_lr, steps=1)
    optimizer = torch.optim.Adam(params.values(), lr=outer_lr)
    step = meta_batch(learner.meta_loss)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(iterations), desc=f"maml omniglot seed {seed}", disable=not progress, leave=False)
    for _ in bar:
        tasks = samplers["train"].sample(meta_batch_size, generator)
        if broken:
            order = torch.argsort(torch.rand(tasks.query_y.shape, generator=generator), dim=1)
            tasks = tasks._replace(query_y=torch.gather(tasks.query_y, 1, order))
        loss, metrics = step(params, tasks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{metrics['accuracy'].item():.3f}")
    evaluate = meta_batch(with_steps(learner.evaluate, test_steps), reduce="none")
    test_generator = torch.Generator().manual_seed(10_000 + seed)
    accuracies = []
    with torch.no_grad():  # torch.func.grad still adapts; no outer graph is kept
        for _ in range(math.ceil(test_episodes / 25)):
            _, metrics = evaluate(params, samplers["test"].sample(25, test_generator))
            accuracies.append(metrics["accuracy"])
    acc = torch.cat(accuracies)[:test_episodes]
    return acc.mean().item(), 1.96 * acc.std().item() / math.sqrt(acc.numel())


def _samplers(root: Path, cache: Path) -> dict[str, EpisodeSampler]:
    return omniglot_samplers(root, ways=5, shots=1, queries=BUDGET["queries"], device="cpu", cache_dir=cache,
                             test_alphabets=("Korean", "Sanskrit"), seed=0)


@pytest.mark.slow
@pytest.mark.data
def test_maml_learns_5way_1shot_omniglot(data_root: Path, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: 1 thread is as fast and robust on a shared CPU
    try:
        cache = tmp_path_factory.getbasetemp() / "omniglot_cache"  # shared with test_omniglot.py in one session
        samplers = _samplers(data_root / "omniglot", cache)
        acc, ci = train_and_test(samplers, seed=0, iterations=BUDGET["iterations"],
                                 meta_batch_size=BUDGET["meta_batch"], width=BUDGET["width"],
                                 inner_lr=BUDGET["inner_lr"], outer_lr=BUDGET["outer_lr"],
                                 test_episodes=BUDGET["test_episodes"], progress=False)
    finally:
        torch.set_num_threads(threads)
    assert acc > THRESHOLD, f"5-way 1-shot test accuracy {acc:.3f} +- {ci:.3f} is not above {THRESHOLD}"


@pytest.mark.slow
@pytest.mark.data
def test_the_same_budget_with_a_broken_meta_gradient_stays_below_the_threshold(data_root: Path, tmp_path_factory):
    """The threshold above can fail: the same budget, seed and test episodes, with each training task's query labels
    permuted (a meta-gradient that no longer points anywhere), lands below it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samplers = _samplers(data_root / "omniglot", tmp_path_factory.getbasetemp() / "omniglot_cache")
        acc, ci = train_and_test(samplers, seed=0, iterations=BUDGET["iterations"],
                                 meta_batch_size=BUDGET["meta_batch"], width=BUDGET["width"],
                                 inner_lr=BUDGET["inner_lr"], outer_lr=BUDGET["outer_lr"],
                                 test_episodes=BUDGET["test_episodes"], progress=False, broken=True)
    finally:
        torch.set_num_threads(threads)
    assert acc < THRESHOLD, f"a broken meta-gradient reached {acc:.3f} +- {ci:.3f}: THRESHOLD {THRESHOLD} catches nothing"


if __name__ == "__main__":  # the seed spread behind THRESHOLD
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--data-root", default=os.environ.get("METAFUNC_DATA", str(Path(__file__).resolve().parents[2]
                                                                              / "shared" / "data")))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import tempfile

    samplers = _samplers(Path(args.data_root) / "omniglot", Path(tempfile.gettempdir()) / "metafunc_omniglot_cache")
    for seed in args.seeds:
        t, c = time.perf_counter(), time.process_time()
        acc, ci = train_and_test(samplers, seed=seed, iterations=BUDGET["iterations"],
                                 meta_batch_size=BUDGET["meta_batch"], width=BUDGET["width"],
                                 inner_lr=BUDGET["inner_lr"], outer_lr=BUDGET["outer_lr"],
                                 test_episodes=BUDGET["test_episodes"])
        print(f"seed {seed}: test accuracy {acc:.4f} +- {ci:.4f}  wall {time.perf_counter() - t:.0f} s  "
              f"cpu {time.process_time() - c:.0f} s", flush=True)
