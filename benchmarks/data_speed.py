"""Speed of the Omniglot data path: decoding the two small zips from scratch, a cached load, and sampling a
meta-batch of 32 5-way 1-shot 15-query tasks with :class:`metafunc.data.EpisodeSampler`, next to a per-image Python
sampler (the learn2learn/torchmeta style: pick classes and images with ``random``, then ``torch.stack``).

Before timing, each sampler's output is checked (shapes, every label 0..ways-1 with the right counts, each label a
single character). The ratio is measured side by side in one run.

    python benchmarks/data_speed.py                 # CPU, data from $METAFUNC_DATA (or ../shared/data)
    python benchmarks/data_speed.py --device cuda   # the sampler on a GPU as well
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from metafunc import Task
from metafunc.data import EpisodeSampler, load_omniglot, omniglot_samplers

__all__ = ["main", "python_sampler", "check_task"]


def _data_root(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("METAFUNC_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return base / "omniglot"


def python_sampler(images: torch.Tensor, labels: torch.Tensor, ways: int, shots: int, queries: int, rng: random.Random):
    """A per-image reference: a dict of example lists per class, ``random.sample``, one ``torch.stack`` per set."""
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        by_class.setdefault(c, []).append(i)
    classes = sorted(by_class)

    def sample(meta_batch: int) -> Task:
        sx, sy, qx, qy = [], [], [], []
        for _ in range(meta_batch):
            picked = rng.sample(classes, ways)
            s_img, s_lab, q_img, q_lab = [], [], [], []
            for label, c in enumerate(picked):
                idx = rng.sample(by_class[c], shots + queries)
                s_img += [images[i].float() / 255 for i in idx[:shots]]
                q_img += [images[i].float() / 255 for i in idx[shots:]]
                s_lab += [label] * shots
                q_lab += [label] * queries
            sx.append(torch.stack(s_img))
            qx.append(torch.stack(q_img))
            sy.append(torch.tensor(s_lab))
            qy.append(torch.tensor(q_lab))
        return Task(torch.stack(sx), torch.stack(sy), torch.stack(qx), torch.stack(qy))

    return sample


def check_task(task: Task, meta_batch: int, ways: int, shots: int, queries: int) -> None:
    """Shapes and label counts of a sampled meta-batch (raises AssertionError)."""
    assert task.support_x.shape == (meta_batch, ways * shots, 1, 28, 28), task.support_x.shape
    assert task.query_x.shape == (meta_batch, ways * queries, 1, 28, 28), task.query_x.shape
    for t in range(meta_batch):
        assert torch.equal(torch.bincount(task.support_y[t], minlength=ways), torch.full((ways,), shots))
        assert torch.equal(torch.bincount(task.query_y[t], minlength=ways), torch.full((ways,), queries))
    assert 0 <= float(task.support_x.min()) and float(task.support_x.max()) <= 1


CPU_TIMES: dict[int, list[float]] = {}


def _time(fn, repeats: int, sync=lambda: None) -> list[float]:
    """Wall-clock seconds of each call; this process's CPU seconds are kept in ``CPU_TIMES[id(result)]``."""
    out, cpu = [], []
    for _ in range(repeats):
        sync()
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        out.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    CPU_TIMES[id(out)] = cpu
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", help="folder with the Omniglot zips")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the sampler's ops are small)")
    p.add_argument("--cold-repeats", type=int, default=3)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = _data_root(args.data_root)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cold: list[float] = []
        cold_cpu: list[float] = []
        for r in range(args.cold_repeats):
            cache = Path(tmp) / f"cold{r}"
            one = _time(lambda: load_omniglot(root, variant="small", cache_dir=cache), 1)
            cold += one
            cold_cpu += CPU_TIMES[id(one)]
        data = load_omniglot(root, variant="small", cache_dir=Path(tmp) / "cold0")
        assert data.images.shape == (4840, 28, 28) and data.num_classes == 242
        warm = _time(lambda: load_omniglot(root, variant="small", cache_dir=Path(tmp) / "cold0"), 10)
        rows.append(("load 2 small zips from scratch (decode + cache)", cold, "< 30 s"))
        CPU_TIMES[id(cold)] = cold_cpu
        rows.append(("cached load", warm, "< 1 s"))

        ways, shots, queries, mb = 5, 1, 15, 32
        devices = ["cpu"] + ([args.device] if args.device != "cpu" else [])
        for device in devices:
            samplers = omniglot_samplers(root, ways=ways, shots=shots, queries=queries, device=device, cache_dir=Path(tmp) / "cold0")
            dev = torch.device(device)
            sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
            for split in ("train", "test"):
                s: EpisodeSampler = samplers[split]
                g = torch.Generator(device=dev).manual_seed(0)
                check_task(s.sample(mb, g).to("cpu"), mb, ways, shots, queries)
                for _ in range(5):
                    s.sample(mb, g)
                times = _time(lambda: s.sample(mb, g), args.repeats, sync)
                name = f"EpisodeSampler.sample 32 x 5w1s15q, {split}{' (rotations)' if s.rotations else ''}, {device}"
                rows.append((name, times, "< 5 ms" if device == "cpu" else ""))
        test_mask = torch.zeros(len(data.characters), dtype=torch.bool)
        test_mask[[i for i, a in enumerate(data.alphabets) if a in ("Korean", "Sanskrit")]] = True
        keep = test_mask[data.labels]
        py = python_sampler(data.images[keep].unsqueeze(1), data.labels[keep], ways, shots, queries, random.Random(0))
        check_task(py(mb), mb, ways, shots, queries)
        times = _time(lambda: py(mb), max(10, args.repeats // 10))
        python_times = times
        rows.append(("per-image Python sampler 32 x 5w1s15q, test, cpu", times, ""))

    cpu_test = next(r for r in rows if r[0].startswith("EpisodeSampler") and "test" in r[0] and r[0].endswith("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores (wall times include waiting for the CPU; CPU time is this process's own work)")
    print(f"| {'what':<62} | {'wall median':>11} | {'wall best':>10} | {'CPU median':>10} | target |")
    print(f"|{'-' * 64}|{'-' * 13}|{'-' * 12}|{'-' * 12}|--------|")
    for name, times, target in rows:
        med, best, cpu = statistics.median(times), min(times), statistics.median(CPU_TIMES[id(times)])
        fmt = (lambda v: f"{v * 1e3:.2f} ms") if med < 1 else (lambda v: f"{v:.2f} s")
        print(f"| {name:<62} | {fmt(med):>11} | {fmt(best):>10} | {fmt(cpu):>10} | {target:<6} |")
    ratio = statistics.median(python_times) / statistics.median(cpu_test[1])
    ratio_cpu = statistics.median(CPU_TIMES[id(python_times)]) / statistics.median(CPU_TIMES[id(cpu_test[1])])
    print(f"EpisodeSampler vs the per-image Python sampler (same run, CPU, test split): {ratio:.0f}x faster in wall "
          f"median, {ratio_cpu:.0f}x in CPU time")


if __name__ == "__main__":
    main()
