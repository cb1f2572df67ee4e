"""``metafunc bench``: time, memory and accuracy of every gradient path on a model, in one table.

For each inner-loop length ``k`` and each gradient path of :data:`metafunc.GRADIENT_PATHS` one meta-step (the default
step :func:`metafunc.meta_value_and_grad`, as ``metafunc train`` takes it) is run ``--repeats`` times after a warm-up. The table reports

* the median wall time of a meta-step;
* the peak memory of the meta-step above what the process held before it. On CUDA this is the caching
  allocator's peak (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the step). On CPU every case runs in a fresh subprocess: it first runs a tiny
  version of the same case (one task, at most two steps) so that the code pages and allocator arenas every
  meta-step needs are mapped, returns freed heap to the OS (``malloc_trim``), reads its resident set size
  (``/proc/self/statm``) as the baseline, runs the case, and reads its lifetime peak (``resource.getrusage
  (RUSAGE_SELF).ru_maxrss``): the difference is the extra physical memory the meta-step needed (model, data and the
  Python runtime are in the baseline, and a fresh process keeps allocator caches of other cases out of it);
* the cosine similarity and the norm ratio of the path's meta-gradient against the exact (unrolled) one on the same
  parameters and tasks, where the exact case ran (``n/a`` when it was not run or did not fit in memory).

Tasks are random inputs with random labels (timing and memory do not depend on the data; the gradient comparison
is between paths on the same tasks).

Example:
    >>> from metafunc.cli.bench import main
    >>> code = main(["--model", "mlp", "--paths", "exact,checkpointed", "--inner-steps", "2", "--meta-batch", "2",
    ...              "--repeats", "1", "--memory", "none", "--quiet"])  # doctest: +ELLIPSIS
    metafunc bench: model=mlp meta-batch=2 ...
    checkpointed  2 ...
    >>> code
    0
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from metafunc._shared import atomic_write_text, strict_json
from metafunc.cli.options import add_learner_option_flags, learner_options_from_args
from metafunc.core.batching import Mode
from metafunc.registry import LEARNERS, learner_for_path, path_names

__all__ = ["main", "build_parser", "BenchConfig", "run_case", "run_bench", "format_table", "build_model",
           "MODELS", "MEMORY_METHODS"]

MODELS = ("conv4", "resnet18", "mlp")
"""Built-in models; anything else is ``module:attr``, a factory returning an ``nn.Module``."""

MEMORY_METHODS = ("auto", "rss", "cuda", "none")
"""``auto`` = ``cuda`` on a GPU and ``rss`` (a subprocess per case) on a CPU."""


@dataclass
class BenchConfig:
    """One benchmark run: which model, which paths, which inner-loop lengths, how to measure.

    Example:
        >>> BenchConfig(model="mlp", paths=["exact"], inner_steps=[1]).meta_batch
        16
    """

    model: str = "conv4"
    paths: list[str] = field(default_factory=path_names)
    inner_steps: list[int] = field(default_factory=lambda: [1, 5, 20, 100])
    meta_batch: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    ways: int = 5
    shots: int = 1
    query: int = 15
    image_size: int | None = None
    width: int | None = None
    input_shape: list[int] | None = None
    inner_lr: float = 0.1
    repeats: int = 3
    warmup: int = 1
    mode: Mode = "vmap"
    memory: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------- models


def _load_factory(spec: str) -> Callable[[], nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"metafunc bench: --model must be one of {', '.join(MODELS)} or 'module:attr' naming a "
                         f"factory that returns an nn.Module (got {spec!r})")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"metafunc bench: cannot import {module_name!r} for --model {spec!r} ({e}); "
                         "run from the folder that holds it or put it on PYTHONPATH") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"metafunc bench: {module_name!r} has no attribute {attr!r} (--model {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"metafunc bench: --model {spec!r} is not callable; name a factory returning an nn.Module")
    return obj  # type: ignore[return-value]


def build_model(cfg: BenchConfig) -> tuple[nn.Module, tuple[int, ...]]:
    """The module and the shape of one input example for ``cfg.model``.

    Torch norm layers in a user's module are swapped for metafunc's exact ones (second-order gradients of torch's
    fused kernels are wrong under ``vmap`` on torch 2.13).

    Example:
        >>> net, shape = build_model(BenchConfig(model="mlp"))
        >>> shape
        (32,)
    """
    from metafunc.nn import models
    from metafunc.nn.norm import convert_norm_layers, find_torch_norm_layers
    from metafunc.nn.resnet import resnet18

    if cfg.model == "conv4":
        size = cfg.image_size or 28
        channels = 1 if size < 64 else 3
        return models.conv4(cfg.ways, in_channels=channels, width=cfg.width or 64, image_size=size), (channels, size, size)
    if cfg.model == "resnet18":
        size = cfg.image_size or (224 if cfg.device.startswith("cuda") else 32)
        variant = "imagenet" if size >= 128 else "small"
        return resnet18(cfg.ways, variant=variant, width=cfg.width or 64), (3, size, size)  # type: ignore[arg-type]
    if cfg.model == "mlp":
        width = cfg.width or 64
        return models.mlp(32, (width, width), cfg.ways, norm="layer"), (32,)
    factory = _load_factory(cfg.model)
    if not cfg.input_shape:
        raise ValueError(f"metafunc bench: --model {cfg.model!r} needs --input-shape (one example's shape, "
                         "e.g. 3,32,32)")
    try:
        module = factory()
    except TypeError as e:
        raise ValueError(f"metafunc bench: --model {cfg.model!r} must be callable with no arguments ({e})") from e
    if not isinstance(module, nn.Module):
        raise ValueError(f"metafunc bench: --model {cfg.model!r} returned {type(module).__name__}, not an nn.Module")
    if find_torch_norm_layers(module):
        module = convert_norm_layers(module)
    return module, tuple(cfg.input_shape)


# ---------------------------------------------------------------------------------------------------------- one case


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _setup(cfg: BenchConfig):
    from metafunc import functionalize
    from metafunc.core.types import Task

    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    module, shape = build_model(cfg)
    module = module.to(device=cfg.device, dtype=dtype)
    model, params = functionalize(module)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        classes = int(model(params, torch.zeros(2, *shape, dtype=dtype, device=cfg.device)).shape[-1])
    n, s, q = cfg.meta_batch, cfg.ways * cfg.shots, cfg.ways * cfg.query
    labels = lambda m: torch.arange(m).remainder(min(cfg.ways, classes)).repeat(n, 1)  # noqa: E731
    tasks = Task(torch.randn(n, s, *shape, generator=g), labels(s), torch.randn(n, q, *shape, generator=g), labels(q))
    return model, params, tasks.to(device=cfg.device, dtype=dtype)


def path_learner(cfg: BenchConfig, path: str, model: Any, steps: int) -> Any:
    """The learner of gradient path (or registered learner) ``path`` at ``steps`` inner steps, with the options of
    ``cfg.options`` that it takes (``checkpoints`` at most ``steps``).

    Example:
        >>> from metafunc import functionalize, models
        >>> model, _ = functionalize(models.mlp())
        >>> path_learner(BenchConfig(options={"lam": 2.0, "checkpoints": 9}), "checkpointed", model, 4).name
        'checkpointed_maml'
    """
    spec = LEARNERS[path] if path in LEARNERS else learner_for_path(path)
    own = {o.name for o in spec.options}
    options = {k: (min(v, steps) if k == "checkpoints" else v) for k, v in cfg.options.items() if k in own}
    return spec.build(model, inner_lr=cfg.inner_lr, steps=steps, loss="cross_entropy", **options)


def run_case(cfg: BenchConfig, path: str, steps: int, *, measure_rss: bool = False) -> dict[str, Any]:
    """Run one (path, steps) case in this process: ``{"times": [...], "peak_bytes": ..., "grad": {...}, ...}``.

    Example:
        >>> out = run_case(BenchConfig(model="mlp", meta_batch=2, repeats=1), "one_step", 3)
        >>> len(out["times"]), sorted(out["grad"])[:1]
        (1, ['body.0.bias'])
    """
    from metafunc.core.types import Task
    from metafunc.step import apply_grads, meta_value_and_grad

    model, params, tasks = _setup(cfg)
    learner = path_learner(cfg, path, model, steps)
    step_fn = meta_value_and_grad(learner, mode=cfg.mode)  # type: ignore[arg-type]
    cuda = cfg.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(cfg.device)

    def meta_step() -> tuple[torch.Tensor, dict]:
        for p in params.values():
            p.grad = None
        loss, metrics, grads = step_fn(params, tasks)
        apply_grads(params, grads)
        return loss, metrics

    if measure_rss:
        # Touch the code and allocator paths with a tiny version of the same case (one task, at most two steps)
        # so that the baseline already holds the pages every meta-step maps, then give freed heap back to the OS.
        small = path_learner(cfg, path, model, min(steps, 2))
        warm = meta_value_and_grad(small, mode=cfg.mode)(params, Task(*(t[:1] for t in tasks)))
        del warm, small
        gc.collect()
        _malloc_trim()
    sync()
    base = 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(cfg.device)
        base = torch.cuda.memory_allocated(cfg.device)
    elif measure_rss:
        base = _rss_bytes()
    times = []
    loss: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = {}
    for i in range(cfg.warmup + cfg.repeats):
        start = time.perf_counter()
        loss, metrics = meta_step()
        sync()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - start)
    peak = None
    if cuda:
        peak = torch.cuda.max_memory_allocated(cfg.device) - base
    elif measure_rss:
        peak = max(0, _max_rss_bytes() - base)
    grad = {k: v.grad.detach().to("cpu", torch.float64).clone() for k, v in params.items()}
    return {"path": path, "steps": steps, "times": times, "peak_bytes": peak, "grad": grad,
            "loss": float(loss.detach()),  # type: ignore[union-attr]
            "accuracy": float(metrics["accuracy"].detach()) if "accuracy" in metrics else float("nan"),
            "params": sum(v.numel() for v in params.values())}


def _worker(spec: str) -> int:
    job = json.loads(spec)
    cfg = BenchConfig(**job["config"])
    try:
        out = run_case(cfg, job["path"], job["steps"], measure_rss=job["rss"])
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:  # type: ignore[attr-defined]
        print(json.dumps({"error": f"out of memory ({type(e).__name__})"}))
        return 0
    torch.save(out.pop("grad"), job["grad_file"])
    print(strict_json(out))
    return 0


def _run_isolated(cfg: BenchConfig, path: str, steps: int, rss: bool) -> dict[str, Any]:
    fd, grad_file = tempfile.mkstemp(suffix=".pt", prefix="metafunc-bench-")
    os.close(fd)
    try:
        job = json.dumps({"config": asdict(cfg), "path": path, "steps": steps, "rss": rss, "grad_file": grad_file})
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        proc = subprocess.run([sys.executable, "-m", "metafunc.cli.bench", "--worker", job], capture_output=True,
                              text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            why = "killed (out of memory?)" if proc.returncode < 0 else f"failed: {tail}"
            return {"path": path, "steps": steps, "error": why}
        out = json.loads(lines[-1])
        if "error" not in out:
            out["grad"] = torch.load(grad_file, weights_only=True)
        out.update(path=path, steps=steps)
        return out
    finally:
        os.unlink(grad_file)


# ---------------------------------------------------------------------------------------------------------- the table


def _compare(grad: dict | None, exact: dict | None) -> tuple[float | None, float | None]:
    if grad is None or exact is None:
        return None, None
    a = torch.cat([grad[k].reshape(-1) for k in exact])
    b = torch.cat([exact[k].reshape(-1) for k in exact])
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 or nb == 0:
        return None, None
    return float(a @ b) / (na * nb), na / nb


def run_bench(cfg: BenchConfig, *, isolate: bool | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run every (steps, path) case of ``cfg`` and return the table rows (without gradients).

    ``isolate`` runs each case in a fresh subprocess (the default when memory is measured by RSS on a CPU).

    Example:
        >>> rows = run_bench(BenchConfig(model="mlp", paths=["exact", "one_step"], inner_steps=[1], meta_batch=2,
        ...                              repeats=1, memory="none"), progress=False)
        >>> round(rows[1]["cosine"], 6)
        1.0
    """
    method = _memory_method(cfg)
    if isolate is None:
        isolate = method == "rss" or (method == "cuda")
    cases = [(k, p) for k in cfg.inner_steps for p in cfg.paths]
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(cases), desc="metafunc bench", dynamic_ncols=True, file=sys.stderr)
    exact_grads: dict[int, dict | None] = {}
    ordered = sorted(cases, key=lambda c: (c[0], c[1] != "exact"))  # exact first, to compare against
    for k, path in ordered:
        if bar is not None:
            bar.set_description(f"{path} k={k}")
        if isolate:
            out = _run_isolated(cfg, path, k, rss=method == "rss")
        else:
            try:
                out = run_case(cfg, path, k)
            except (torch.cuda.OutOfMemoryError, MemoryError) as e:  # type: ignore[attr-defined]
                out = {"path": path, "steps": k, "error": f"out of memory ({type(e).__name__})"}
        grad = out.pop("grad", None)
        if path == "exact":
            exact_grads[k] = grad
        cosine, ratio = _compare(grad, exact_grads.get(k))
        times = out.get("times") or []
        rows.append({"model": cfg.model, "path": path, "steps": k, "meta_batch": cfg.meta_batch,
                     "median_s": statistics.median(times) if times else None, "times_s": times,
                     "peak_mib": None if out.get("peak_bytes") is None else out["peak_bytes"] / 2 ** 20,
                     "cosine": cosine, "norm_ratio": ratio, "loss": out.get("loss"),
                     "accuracy": out.get("accuracy"), "error": out.get("error")})
        if bar is not None:
            bar.update(1)
            if out.get("loss") is not None:
                bar.set_postfix(loss=f"{out['loss']:.3f}", acc=f"{out.get('accuracy', float('nan')):.2f}")
    if bar is not None:
        bar.close()
    order = {p: i for i, p in enumerate(cfg.paths)}
    return sorted(rows, key=lambda r: (r["steps"], order[r["path"]]))


def format_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """The rows as an aligned text table (or a Markdown table).

    Example:
        >>> print(format_table([{"path": "exact", "steps": 1, "median_s": 0.01, "peak_mib": 2.0, "cosine": 1.0,
        ...                      "norm_ratio": 1.0, "error": None}]))  # doctest: +NORMALIZE_WHITESPACE
        path   k  time/meta-step  peak memory  cos vs exact  norm / exact norm
        exact  1         10.0 ms      2.0 MiB      1.000000             1.0000
    """
    header = ["path", "k", "time/meta-step", "peak memory", "cos vs exact", "norm / exact norm"]
    body = []
    for r in rows:
        if r.get("error"):
            body.append([r["path"], str(r["steps"]), r["error"], "", "", ""])
            continue
        t = r["median_s"]
        time_s = f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"
        mem = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f} MiB"
        cos = "n/a" if r["cosine"] is None else f"{r['cosine']:.6f}"
        ratio = "n/a" if r["norm_ratio"] is None else f"{r['norm_ratio']:.4f}"
        body.append([r["path"], str(r["steps"]), time_s, mem, cos, ratio])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(b) for b in body])


def _memory_method(cfg: BenchConfig) -> str:
    if cfg.memory != "auto":
        return cfg.memory
    return "cuda" if cfg.device.startswith("cuda") else "rss"


def _plot(rows: Sequence[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["path"] for r in rows):
        mine = [r for r in rows if r["path"] == name and not r.get("error")]
        ks = [r["steps"] for r in mine]
        axes[0].plot(ks, [r["median_s"] for r in mine], marker="o", label=name)
        if all(r["peak_mib"] is not None for r in mine):
            axes[1].plot(ks, [r["peak_mib"] for r in mine], marker="o", label=name)
    for ax, label in zip(axes, ["median time per meta-step (s)", "peak memory of a meta-step (MiB)"]):
        ax.set_xlabel("inner steps k")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (got {text!r})") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers (got {text!r})")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``metafunc bench``.

    Example:
        >>> build_parser().parse_args(["--paths", "exact,one_step", "--inner-steps", "1,5"]).inner_steps
        [1, 5]
    """
    p = argparse.ArgumentParser(prog="metafunc bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--model", default="conv4",
                   help="conv4 (Omniglot 28x28, width 64), resnet18 (224x224 on cuda, small 32x32 variant on cpu), "
                        "mlp, or module:attr naming a factory that returns your nn.Module (needs --input-shape)")
    p.add_argument("--paths", default=",".join(path_names()),
                   help="comma-separated gradient paths (" + ", ".join(path_names()) + ") or registered learner names")
    p.add_argument("--inner-steps", type=_int_list, default=[1, 5, 20, 100], help="comma-separated k values")
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1, help="support examples per class")
    p.add_argument("--query", type=int, default=15, help="query examples per class")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--width", type=int, default=None, help="model width (conv4 filters, resnet18 base width, mlp)")
    p.add_argument("--input-shape", default=None, help="one example's shape for a module:attr model, e.g. 3,32,32")
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3, help="timed meta-steps per case (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed meta-steps before timing")
    p.add_argument("--mode", default="vmap", choices=["vmap", "loop"], help="meta_batch mode")
    p.add_argument("--memory", default="auto", choices=list(MEMORY_METHODS),
                   help="auto: CUDA allocator peak on a GPU, peak RSS of a subprocess per case on a CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the configuration and the rows to this JSON file")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--plot", default=None, help="save time and memory against k to this image (matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    add_learner_option_flags(p)
    return p


def _config_from_args(args: argparse.Namespace) -> BenchConfig:
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in path_names() and p not in LEARNERS]
    if unknown or not paths:
        raise ValueError(f"metafunc bench: unknown path(s) {unknown} in --paths {args.paths!r}; "
                         f"choose from {','.join(path_names())} or a learner of {','.join(LEARNERS)}")
    for name in ("meta_batch", "ways", "shots", "query", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"metafunc bench: --{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.warmup < 0:
        raise ValueError(f"metafunc bench: --warmup must be >= 0 (got {args.warmup})")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ValueError(f"metafunc bench: --device must be cpu, cuda or cuda:N (got {args.device!r})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("metafunc bench: --device cuda but torch.cuda.is_available() is False on this machine; "
                         "use --device cpu")
    if args.memory == "cuda" and not args.device.startswith("cuda"):
        raise ValueError("metafunc bench: --memory cuda needs --device cuda; use --memory rss on a CPU")
    if args.memory == "rss" and args.device.startswith("cuda"):
        raise ValueError("metafunc bench: --memory rss measures host memory; use --memory cuda on a GPU")
    if not (math.isfinite(args.inner_lr) and args.inner_lr > 0):
        raise ValueError(f"metafunc bench: --inner-lr must be > 0 (got {args.inner_lr})")
    shape = None
    if args.input_shape:
        try:
            shape = [int(v) for v in args.input_shape.split(",")]
        except ValueError:
            raise ValueError(f"metafunc bench: --input-shape must be comma-separated ints (got {args.input_shape!r})") from None
    return BenchConfig(model=args.model, paths=paths, inner_steps=args.inner_steps, meta_batch=args.meta_batch,
                       device=args.device, dtype=args.dtype, ways=args.ways, shots=args.shots, query=args.query,
                       image_size=args.image_size, width=args.width, input_shape=shape, inner_lr=args.inner_lr,
                       repeats=args.repeats, warmup=args.warmup, mode=args.mode, memory=args.memory,
                       options=learner_options_from_args(args), seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``metafunc bench`` with ``argv`` (default ``sys.argv[1:]``); print the table; return the exit status.

    Example:
        >>> code = main(["--model", "mlp", "--paths", "exact,first_order", "--inner-steps", "1", "--meta-batch", "2",
        ...              "--repeats", "1", "--memory", "none", "--quiet"])  # doctest: +ELLIPSIS
        metafunc bench: model=mlp ...
        first_order  1 ...
        >>> code
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return int(e.code or 0)
    if args.worker is not None:
        return _worker(args.worker)
    try:
        cfg = _config_from_args(args)
        from metafunc import functionalize
        module, _ = build_model(cfg)
        for k in cfg.inner_steps:  # eager checks of every path's options
            for p in cfg.paths:
                path_learner(cfg, p, functionalize(module)[0], k)
    except (ValueError, TypeError) as e:
        print(str(e) if str(e).startswith("metafunc bench") else f"metafunc bench: {e}", file=sys.stderr)
        return 2
    rows = run_bench(cfg, progress=not args.quiet)
    method = _memory_method(cfg)
    device = torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda") else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    memory_note = {"cuda": "CUDA allocator peak above the allocation before the step",
                   "rss": "peak RSS of a fresh subprocess above its RSS before the step",
                   "none": "not measured"}[method]
    print(f"metafunc bench: model={cfg.model} meta-batch={cfg.meta_batch} ways={cfg.ways} shots={cfg.shots} "
          f"query={cfg.query} dtype={cfg.dtype} mode={cfg.mode} device={device} torch={torch.__version__}")
    print(f"time: median of {cfg.repeats} meta-steps (forward + backward) after {cfg.warmup} warm-up; "
          f"memory: {memory_note}")
    print(format_table(rows, markdown=args.markdown))
    if args.json:
        atomic_write_text(args.json, strict_json({"config": asdict(cfg), "device": device, "torch": torch.__version__,
                                                  "memory_method": method, "rows": rows}, indent=2))
    if args.plot:
        _plot(rows, args.plot, f"{cfg.model}, meta-batch {cfg.meta_batch}, {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
