"""Every case of a benchmark run, compared with the exact (unrolled) meta-gradient, as table rows; the rows as text,
Markdown or a plot of time and memory against the inner-loop length.

Example:
    >>> rows = run_bench(BenchConfig(model="mlp", paths=["exact"], inner_steps=[1], meta_batch=1, repeats=1,
    ...                              memory="none"), progress=False)
    >>> rows[0]["path"], round(rows[0]["cosine"], 6)
    ('exact', 1.0)
"""

from __future__ import annotations

import statistics
import sys
from typing import Any, Sequence

import torch

from metafunc.bench.case import run_case, run_isolated
from metafunc.bench.config import BenchConfig, memory_method

__all__ = ["run_bench", "format_table", "plot_rows"]


def _compare(grad: dict | None, exact: dict | None) -> tuple[float | None, float | None]:
    """Cosine similarity and norm ratio of ``grad`` against ``exact`` (``None`` when either is missing or zero)."""
    if grad is None or exact is None:
        return None, None
    a = torch.cat([grad[k].reshape(-1) for k in exact])
    b = torch.cat([exact[k].reshape(-1) for k in exact])
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 or nb == 0:
        return None, None
    return float(a @ b) / (na * nb), na / nb


def _run_one(cfg: BenchConfig, path: str, k: int, isolate: bool, method: str) -> dict[str, Any]:
    if isolate:
        return run_isolated(cfg, path, k, rss=method == "rss")
    try:
        return run_case(cfg, path, k)
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:  # type: ignore[attr-defined]
        return {"path": path, "steps": k, "error": f"out of memory ({type(e).__name__})"}


def _row(cfg: BenchConfig, out: dict[str, Any], cosine: float | None, ratio: float | None) -> dict[str, Any]:
    times = out.get("times") or []
    return {"model": cfg.model, "path": out["path"], "steps": out["steps"], "meta_batch": cfg.meta_batch,
            "median_s": statistics.median(times) if times else None, "times_s": times,
            "peak_mib": None if out.get("peak_bytes") is None else out["peak_bytes"] / 2 ** 20,
            "cosine": cosine, "norm_ratio": ratio, "loss": out.get("loss"),
            "accuracy": out.get("accuracy"), "error": out.get("error"), "plan": out.get("plan")}


def run_bench(cfg: BenchConfig, *, isolate: bool | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run every (steps, path) case of ``cfg`` and return the table rows (without gradients).

    ``isolate`` runs each case in a fresh subprocess (the default when memory is measured, by RSS on a CPU or by
    the CUDA allocator on a GPU). The exact case of each ``k`` runs first; every path's meta-gradient is compared
    with it (``cosine``, ``norm_ratio``; ``None`` where the exact case was not run or did not fit in memory).

    Example:
        >>> rows = run_bench(BenchConfig(model="mlp", paths=["exact", "one_step"], inner_steps=[1], meta_batch=2,
        ...                              repeats=1, memory="none"), progress=False)
        >>> round(rows[1]["cosine"], 6)
        1.0
    """
    method = memory_method(cfg)
    if isolate is None:
        isolate = method in ("rss", "cuda")
    cases = sorted(((k, p) for k in cfg.inner_steps for p in cfg.paths), key=lambda c: (c[0], c[1] != "exact"))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(cases), desc="metafunc bench", dynamic_ncols=True, file=sys.stderr)
    rows: list[dict[str, Any]] = []
    exact_grads: dict[int, dict | None] = {}
    for k, path in cases:
        if bar is not None:
            bar.set_description(f"{path} k={k}")
        out = _run_one(cfg, path, k, isolate, method)
        grad = out.pop("grad", None)
        if path == "exact":
            exact_grads[k] = grad
        rows.append(_row(cfg, out, *_compare(grad, exact_grads.get(k))))
        if bar is not None:
            bar.update(1)
            if out.get("loss") is not None:
                bar.set_postfix(loss=f"{out['loss']:.3f}", acc=f"{out.get('accuracy', float('nan')):.2f}")
    if bar is not None:
        bar.close()
    order = {p: i for i, p in enumerate(cfg.paths)}
    return sorted(rows, key=lambda r: (r["steps"], order[r["path"]]))


def format_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """The rows as an aligned text table (or a Markdown table); with a ``plan`` in the rows (``mode="auto"``), a
    last column says how each case's meta-batch ran.

    Example:
        >>> print(format_table([{"path": "exact", "steps": 1, "median_s": 0.01, "peak_mib": 2.0, "cosine": 1.0,
        ...                      "norm_ratio": 1.0, "error": None}]))  # doctest: +NORMALIZE_WHITESPACE
        path   k  time/meta-step  peak memory  cos vs exact  norm / exact norm
        exact  1         10.0 ms      2.0 MiB      1.000000             1.0000
    """
    plans = any(r.get("plan") for r in rows)
    header = ["path", "k", "time/meta-step", "peak memory", "cos vs exact", "norm / exact norm"] + (
        ["meta-batch runs as"] if plans else [])
    body = []
    for r in rows:
        if r.get("error"):
            body.append([r["path"], str(r["steps"]), r["error"], "", "", ""] + ([""] if plans else []))
            continue
        t = r["median_s"]
        time_s = f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"
        mem = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f} MiB"
        cos = "n/a" if r["cosine"] is None else f"{r['cosine']:.6f}"
        ratio = "n/a" if r["norm_ratio"] is None else f"{r['norm_ratio']:.4f}"
        body.append([r["path"], str(r["steps"]), time_s, mem, cos, ratio] + ([r.get("plan") or ""] if plans else []))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(b) for b in body])


def plot_rows(rows: Sequence[dict[str, Any]], path: str, title: str) -> None:
    """Save the median time and the peak memory of each gradient path against ``k`` (log-log) to the image ``path``.

    Example:
        >>> import os, tempfile
        >>> rows = [{"path": "exact", "steps": k, "median_s": 0.01 * k, "peak_mib": 2.0 * k} for k in (1, 5)]
        >>> out = os.path.join(tempfile.mkdtemp(), "bench.png")
        >>> plot_rows(rows, out, "example")
        >>> os.path.getsize(out) > 0
        True
    """
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
