"""One meta-step of MAML and ProtoNets in metafunc, higher, learn2learn, TorchOpt, parallel-metalearn and a plain loop.

Same module (Conv-4, 64 filters, BatchNorm, 28x28 inputs), same tasks (5-way 1-shot, 15 queries per class), same
machine, one run. Before timing a configuration, every implementation's meta-gradient is checked against the plain
``torch.autograd`` loop in float64 (``metafunc.core.tree.tree_relative_error`` < 1e-10); one that disagrees is not
timed. Times are medians over rounds in which the implementations alternate (the machine is shared, so only
side-by-side ratios mean anything). Peak memory (``--memory``): each case runs once in a fresh subprocess; on a CPU
the number is the peak resident set size during one meta-step above the resident size just before it
(``VmHWM`` of ``/proc/self/status``, reset before the step, minus the RSS before, after a warm-up step and ``malloc_trim``, with glibc's mmap
threshold fixed at 64 KiB so that freed tensors leave the RSS at once); on CUDA it is
``torch.cuda.max_memory_allocated`` above the allocation before the step.

    python benchmarks/peers.py                        # the full table on this CPU
    python benchmarks/peers.py --configs maml2-1 --meta-batch 4 16 32 --memory --markdown
    python benchmarks/peers.py --device cuda          # on a GPU

Install the peers with ``pip install -e .[peers] --no-deps`` style care: see the Performance section of README.md.
parallel-metalearn (``pip install --no-deps parallel-metalearn==0.5.6``; it needs only torch, numpy and tqdm) is not in
that extra.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_impls import load  # noqa: E402

import metafunc  # noqa: E402
from metafunc.core.tree import tree_relative_error  # noqa: E402

__all__ = ["CONFIGS", "IMPLS", "conv4", "make_tasks", "build_step", "check_gradients", "time_cases", "main"]

CONFIGS: dict[str, dict[str, Any]] = {
    "maml2-1": dict(algorithm="maml", first_order=False, steps=1),
    "maml1-1": dict(algorithm="maml", first_order=True, steps=1),
    "maml2-5": dict(algorithm="maml", first_order=False, steps=5),
    "maml1-5": dict(algorithm="maml", first_order=True, steps=5),
    "protonet": dict(algorithm="protonet"),
}
"""``maml<order>-<inner steps>`` and ``protonet``."""

IMPLS = ("metafunc", "metafunc:workers1", "metafunc:channels_last", "metafunc:workers1-channels_last",
         "metafunc:together-channels_last", "metafunc:compiled", "metafunc:compiled-cudagraphs", "metafunc:meta_batch-auto", "metafunc:loop", "metafunc:vmap", "metafunc:vmap-chunk4",
         "plain", "higher", "learn2learn", "torchopt", "parallel_metalearn")
"""Rows of the table; ``metafunc`` is ``meta_value_and_grad`` with ``mode="auto"``, the default fast meta-step."""

PEERS = ("plain", "higher", "learn2learn", "torchopt", "parallel_metalearn")
WAYS, SHOTS, QUERIES, INNER_LR = 5, 1, 15, 0.4


def conv4(width: int = 64, *, protonet: bool = False) -> torch.nn.Module:
    """metafunc's Conv-4 (exact BatchNorm); for ProtoNets, its feature extractor, flattened."""
    net = metafunc.nn.models.conv4(ways=WAYS, width=width, image_size=28, norm="batch")
    return torch.nn.Sequential(net.features, torch.nn.Flatten()) if protonet else net


def make_tasks(meta_batch: int, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               seed: int = 0) -> metafunc.Task:
    """Omniglot-shaped random tasks: 5-way 1-shot, 15 queries per class, 1x28x28 images, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(meta_batch, 1)
    query_y = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(meta_batch, 1)
    tasks = metafunc.Task(torch.randn(meta_batch, WAYS * SHOTS, 1, 28, 28, generator=g, dtype=dtype), support_y,
                          torch.randn(meta_batch, WAYS * QUERIES, 1, 28, 28, generator=g, dtype=dtype), query_y)
    return tasks.to(device)


def build_step(impl: str, config: str, module: torch.nn.Module, tasks: metafunc.Task) -> Callable[[], dict] | None:
    """The meta-step of ``impl`` on a copy of ``module``, or ``None`` when the library has no such algorithm."""
    name, _, variant = impl.partition(":")
    lib = load(name)
    if not lib.AVAILABLE:
        return None
    cfg = CONFIGS[config]
    module = copy.deepcopy(module)
    kwargs = {"variant": variant or "default"} if name == "metafunc" else {}
    if cfg["algorithm"] == "protonet":
        if lib.protonet_step is None:
            return None
        return lib.protonet_step(module, tasks, **kwargs)
    return lib.maml_step(module, tasks, inner_lr=INNER_LR, steps=cfg["steps"], first_order=cfg["first_order"],
                         **kwargs)


def _why_missing(impl: str, config: str) -> str:
    if impl == "metafunc:compiled-cudagraphs":
        return "CUDA graphs need a CUDA device"
    lib = load(impl.partition(":")[0])
    if not lib.AVAILABLE:
        return lib.WHY
    return "no ProtoNet API (same ops as the plain loop)" if CONFIGS[config]["algorithm"] == "protonet" else ""


def check_gradients(config: str, impls: tuple[str, ...], *, device: str, width: int = 64,
                    tasks: int = 2) -> dict[str, float | None]:
    """Relative error of each implementation's float64 meta-gradient against the plain loop's (None: not run)."""
    torch.manual_seed(0)
    module = conv4(width, protonet=config == "protonet").to(device=device, dtype=torch.float64)
    data = make_tasks(tasks, dtype=torch.float64, device=device, seed=1)
    reference = build_step("plain", config, module, data)()
    errors: dict[str, float | None] = {}
    for impl in impls:
        step = build_step(impl, config, module, data)
        errors[impl] = None if step is None else float(tree_relative_error(step(), reference))
    return errors


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_cases(config: str, meta_batch: int, impls: tuple[str, ...], *, device: str, rounds: int,
               width: int = 64, progress: Any = None, warmup: bool = True) -> dict[str, list[float]]:
    """Seconds per meta-step of each implementation: a warm-up, then ``rounds`` rounds alternating them.

    Returns ``{impl: {"wall": [...], "cpu": [...]}}``: wall-clock seconds and this process's CPU seconds
    (``time.process_time``, all threads). On a shared CPU the CPU time is the robust number: it does not count the
    time the process waited for a core."""
    torch.manual_seed(0)
    module = conv4(width, protonet=config == "protonet").to(device)
    data = make_tasks(meta_batch, device=device)
    steps = {impl: build_step(impl, config, module, data) for impl in impls}
    steps = {k: v for k, v in steps.items() if v is not None}
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for round_ in range(0 if warmup else 1, rounds + 1):
        order = list(steps) if round_ % 2 == 0 else list(reversed(steps))
        for impl in order:
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[impl]()
            _sync(device)
            if round_ > 0:
                times[impl].append(time.perf_counter() - start)
                cpu[impl].append(time.process_time() - start_cpu)
            if progress is not None:
                progress.set_postfix_str(f"{config} mb={meta_batch} {impl} {time.perf_counter() - start:.2f}s")
        gc.collect()
    return {k: {"wall": times[k], "cpu": cpu[k], "plan": _plan(steps[k])} for k in times}


def _plan(step: Callable) -> str | None:
    """The way metafunc's step ran its meta-batches (``mode="auto"`` chooses it), None for the peers."""
    return step.plan() if hasattr(step, "plan") else None


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _memory_worker(spec: str) -> int:
    args = json.loads(spec)
    torch.manual_seed(0)
    device = args["device"]
    module = conv4(args["width"], protonet=args["config"] == "protonet").to(device)
    data = make_tasks(args["meta_batch"], device=device)
    step = build_step(args["impl"], args["config"], module, data)
    step()  # warm-up: one-time allocations (kernels, caches) are not the meta-step's
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # pragma: no cover - not glibc
            pass
        before = _rss()
        # VmHWM is the peak RSS since the process started; the warm-up step made it at least the step's peak, so
        # reset it (Linux >= 4.0: writing 5 to clear_refs resets it to the current RSS). getrusage's ru_maxrss is not
        # reset by this once a thread has exited, so it is not used.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        step()
        peak = _peak_rss() - before
    print(json.dumps({"peak_bytes": peak, "plan": _plan(step)}))
    return 0


def measure_memory(impl: str, config: str, meta_batch: int, *, device: str,
                   width: int = 64) -> dict[str, Any] | None:
    """Peak bytes of one meta-step above the baseline, measured in a fresh subprocess: ``{"peak_bytes", "plan"}``
    (``plan``: the way metafunc's step ran there, None for a peer)."""
    spec = json.dumps(dict(impl=impl, config=config, meta_batch=meta_batch, device=device, width=width))
    out = subprocess.run([sys.executable, __file__, "--memory-worker", spec], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"})
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _memory_row(impl: str, config: str, meta_batch: int, args: argparse.Namespace) -> dict[str, Any]:
    got = measure_memory(impl, config, meta_batch, device=args.device, width=args.width) or {}
    return {"peak_bytes": got.get("peak_bytes"), "memory_plan": got.get("plan")}


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]], *, markdown: bool) -> str:
    """Median seconds, peak MiB and their ratios to the fastest (leanest) peer of the same case."""
    head = ["config", "tasks", "implementation", "grad rel. err (f64)", "median wall s", "x fastest peer",
            "median CPU s", "x fastest peer (CPU)", "peak MiB", "x leanest peer", "note"]
    lines = []
    for r in rows:
        lines.append([r["config"], str(r["meta_batch"]), r["impl"], _fmt(r.get("grad_error"), ".1e"),
                      _fmt(r.get("median_s"), ".3f"), _fmt(r.get("time_ratio"), ".2f"),
                      _fmt(r.get("median_cpu_s"), ".3f"), _fmt(r.get("cpu_ratio"), ".2f"),
                      _fmt(None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**20, ".0f"),
                      _fmt(r.get("memory_ratio"), ".2f"), _note(r)])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*line) for line in lines])


def _note(row: dict[str, Any]) -> str:
    """The row's note, and the plan metafunc's step ran (in the timed run; in the memory run where that differs)."""
    notes = [row.get("note", "")] + ([f"plan: {row['plan']}"] if row.get("plan") else [])
    if row.get("memory_plan") and row.get("memory_plan") != row.get("plan"):
        notes.append(f"memory run's plan: {row['memory_plan']}")
    return "; ".join(n for n in notes if n)


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["config"], r["meta_batch"]) for r in rows if r.get("median_s")}, key=str)
    impls = [i for i in IMPLS if any(r["impl"] == i and r.get("median_s") for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        ys = [next((r["median_s"] for r in rows if (r["config"], r["meta_batch"]) == c and r["impl"] == impl
                    and r.get("median_s")), 0.0) for c in cases]
        ax.bar([i + j * width for i in range(len(cases))], ys, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], [f"{c}\n{m} tasks" for c, m in cases])
    ax.set_ylabel("seconds per meta-step (median)")
    ax.set_title(f"Conv-4 BN 28x28, 5-way 1-shot, torch {torch.__version__.split('+')[0]}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--meta-batch", nargs="+", type=int, default=[4, 16, 32])
    parser.add_argument("--impls", nargs="+", default=None, choices=list(IMPLS),
                        help="rows to run (default: all; on a CPU all but the compiled steps, whose first call "
                             "compiles for minutes)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up (median reported)")
    parser.add_argument("--width", type=int, default=64, help="Conv-4 filters")
    parser.add_argument("--check-width", type=int, default=None,
                        help="Conv-4 filters of the float64 gradient check (default: --width)")
    parser.add_argument("--no-warmup", action="store_true", help="time from the first step (large, slow cases)")
    parser.add_argument("--memory-only", action="store_true", help="measure peak memory, no timing")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory, one subprocess per case")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--plot", default=None, help="write a bar chart (PNG) here")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        return _memory_worker(args.memory_worker)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    from tqdm import tqdm

    impls = tuple(args.impls or [i for i in IMPLS if args.device.startswith("cuda") or "compiled" not in i])
    rows: list[dict[str, Any]] = []
    total = len(args.configs) * (1 + len(args.meta_batch))
    with tqdm(total=total, desc="peers", file=sys.stderr) as bar:
        for config in args.configs:
            bar.set_postfix_str(f"{config}: float64 gradient check")
            errors = check_gradients(config, impls, device=args.device, width=args.check_width or args.width)
            bar.update()
            ok = tuple(i for i in impls if errors[i] is not None and errors[i] < 1e-10)
            for mb in args.meta_batch:
                times = {} if args.memory_only else time_cases(config, mb, ok, device=args.device, rounds=args.rounds, width=args.width,
                                   progress=bar, warmup=not args.no_warmup)
                case = []
                for impl in impls:
                    row: dict[str, Any] = dict(config=config, meta_batch=mb, impl=impl, grad_error=errors[impl])
                    if args.memory_only and impl in ok:
                        row.update(_memory_row(impl, config, mb, args))
                    elif impl in times:
                        row["median_s"] = statistics.median(times[impl]["wall"])
                        row["times_s"] = times[impl]["wall"]
                        row["median_cpu_s"] = statistics.median(times[impl]["cpu"])
                        row["cpu_times_s"] = times[impl]["cpu"]
                        row["plan"] = times[impl]["plan"]
                        if args.memory:
                            row.update(_memory_row(impl, config, mb, args))
                    elif errors[impl] is None:
                        row["note"] = _why_missing(impl, config)
                    else:
                        row["note"] = "gradient mismatch: not timed"
                    case.append(row)
                peer_t = [r["median_s"] for r in case if r["impl"] in PEERS and r.get("median_s")]
                peer_m = [r["peak_bytes"] for r in case if r["impl"] in PEERS and r.get("peak_bytes")]
                peer_c = [r["median_cpu_s"] for r in case if r["impl"] in PEERS and r.get("median_cpu_s")]
                for r in case:
                    if r.get("median_s") and peer_t:
                        r["time_ratio"] = r["median_s"] / min(peer_t)
                    if r.get("median_cpu_s") and peer_c:
                        r["cpu_ratio"] = r["median_cpu_s"] / min(peer_c)
                    if r.get("peak_bytes") and peer_m:
                        r["memory_ratio"] = r["peak_bytes"] / min(peer_m)
                rows += case
                if args.json:  # after every case, so an interrupted run keeps what it measured
                    Path(args.json).write_text(json.dumps(rows, indent=1))
                bar.update()
    print(f"device: {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"python {sys.version.split()[0]}; gradient check: float64, width {args.check_width or args.width}, "
          f"2 tasks; {args.rounds} timed rounds")
    print(table(rows, markdown=args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        _plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
