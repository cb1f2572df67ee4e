"""One benchmark case, a gradient path at one inner-loop length: its model and tasks, its learner, its timed
meta-steps and its peak memory, in this process or in a fresh subprocess (``python -m metafunc.bench JOB``).

Example:
    >>> out = run_case(BenchConfig(model="mlp", meta_batch=2, repeats=1, warmup=0), "exact", 1)
    >>> len(out["times"]), out["peak_bytes"] is None
    (1, True)
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from metafunc._shared import strict_json
from metafunc.bench.config import BenchConfig, build_model
from metafunc.core.types import Metrics, ModelFn, Params, Task
from metafunc.registry import LEARNERS, learner_for_path

__all__ = ["bench_problem", "path_learner", "check_cases", "run_case", "run_isolated", "worker_main"]


def bench_problem(cfg: BenchConfig) -> tuple[ModelFn, Params, Task]:
    """``(model, params, tasks)`` of ``cfg``: the model of :func:`build_model` made functional, on ``cfg.device`` in
    ``cfg.dtype``, and a meta-batch of random inputs with random labels (timing and memory do not depend on the data;
    the gradient comparison is between paths on the same tasks), all seeded by ``cfg.seed``.

    Example:
        >>> model, params, tasks = bench_problem(BenchConfig(model="mlp", meta_batch=2, ways=3, shots=1, query=2))
        >>> tuple(tasks.support_x.shape), tuple(tasks.query_y.shape)
        ((2, 3, 32), (2, 6))
    """
    from metafunc import functionalize

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
    """The learner of gradient path (or registered learner) ``path`` at ``steps`` inner steps, built by the registry
    (``LEARNERS[path].build``, or ``learner_for_path(path).build``) with the options of ``cfg.options`` that it
    takes (``checkpoints`` at most ``steps``).

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


def check_cases(cfg: BenchConfig) -> None:
    """Build ``cfg``'s model and the learner of every (path, steps) case, so that a bad model, path or option is a
    ``ValueError``/``TypeError`` before anything runs.

    Example:
        >>> check_cases(BenchConfig(model="mlp", paths=["implicit"], inner_steps=[2], options={"lam": 0.0}))
        Traceback (most recent call last):
        ...
        ValueError: imaml: lam must be > 0 (got 0.0)
    """
    from metafunc import functionalize

    module, _ = build_model(cfg)
    model = functionalize(module)[0]
    for k in cfg.inner_steps:
        for p in cfg.paths:
            path_learner(cfg, p, model, k)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    """The peak RSS since the last :func:`_reset_peak_rss` (``VmHWM``), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: ``5`` to ``clear_refs``), so that the steps before the
    measured one (``mode="auto"`` measuring its plans, the priming case) do not set the peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _prime(cfg: BenchConfig, path: str, model: Any, steps: int, params: Params, tasks: Task) -> None:
    """Touch the code and allocator paths with a tiny version of the same case (one task, at most two steps) so that
    the RSS baseline already holds the pages every meta-step maps, then give freed heap back to the OS."""
    from metafunc.step import meta_value_and_grad

    small = path_learner(cfg, path, model, min(steps, 2))
    warm = meta_value_and_grad(small, mode=cfg.mode)(params, Task(*(t[:1] for t in tasks)))
    del warm, small
    gc.collect()
    _malloc_trim()


def _memory_base(cfg: BenchConfig, measure_rss: bool) -> int:
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(cfg.device)
        return torch.cuda.memory_allocated(cfg.device)
    if not measure_rss:
        return 0
    _reset_peak_rss()
    return _rss_bytes()


def _memory_peak(cfg: BenchConfig, base: int, measure_rss: bool) -> int | None:
    if cfg.device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(cfg.device) - base
    return max(0, _max_rss_bytes() - base) if measure_rss else None


def _timed(cfg: BenchConfig, meta_step: Callable[[], tuple[torch.Tensor, Metrics]]
           ) -> tuple[list[float], torch.Tensor, Metrics]:
    """``cfg.warmup`` untimed then ``cfg.repeats`` timed meta-steps (synchronised on a GPU); the last loss, metrics."""
    def sync() -> None:
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize(cfg.device)

    times: list[float] = []
    loss, metrics = torch.tensor(float("nan")), Metrics()
    for i in range(cfg.warmup + cfg.repeats):
        start = time.perf_counter()
        loss, metrics = meta_step()
        sync()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - start)
    return times, loss, metrics


def _finish_measuring(step_fn: Any, meta_step: Callable[[], Any]) -> int:
    """Run ``mode="auto"``'s measuring meta-steps (each candidate plan on real meta-steps) before anything is timed,
    so that the timed steps run the chosen plan; returns how many ran (0 for a fixed mode)."""
    planner = getattr(step_fn, "planner", None)
    calls = 0
    while planner is not None and planner.plan() is None and calls < 100:
        meta_step()
        calls += 1
    return calls


def run_case(cfg: BenchConfig, path: str, steps: int, *, measure_rss: bool = False) -> dict[str, Any]:
    """Run one (path, steps) case in this process: ``{"times": [...], "peak_bytes": ..., "grad": {...}, ...}``.

    Each meta-step is the default step :func:`metafunc.meta_value_and_grad`, as ``metafunc train`` takes it; with
    ``mode="auto"`` its measuring steps run first, untimed, and ``"plan"`` says what it chose.

    Example:
        >>> out = run_case(BenchConfig(model="mlp", meta_batch=2, repeats=1), "one_step", 3)
        >>> len(out["times"]), sorted(out["grad"])[:1]
        (1, ['body.0.bias'])
    """
    from metafunc.step import apply_grads, meta_value_and_grad

    model, params, tasks = bench_problem(cfg)
    step_fn = meta_value_and_grad(path_learner(cfg, path, model, steps), mode=cfg.mode)

    def meta_step() -> tuple[torch.Tensor, Metrics]:
        for p in params.values():
            p.grad = None
        loss, metrics, grads = step_fn(params, tasks)
        apply_grads(params, grads)
        return loss, metrics

    measuring = _finish_measuring(step_fn, meta_step)
    if measure_rss:
        _prime(cfg, path, model, steps, params, tasks)
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize(cfg.device)
    base = _memory_base(cfg, measure_rss)
    times, loss, metrics = _timed(cfg, meta_step)
    peak = _memory_peak(cfg, base, measure_rss)
    grad = {k: v.grad.detach().to("cpu", torch.float64).clone() for k, v in params.items()}  # type: ignore[union-attr]
    plan = getattr(step_fn, "plan", None)
    return {"path": path, "steps": steps, "times": times, "peak_bytes": peak, "grad": grad,
            "plan": None if plan is None else str(plan), "measuring_steps": measuring,
            "loss": float(loss.detach()),
            "accuracy": float(metrics["accuracy"].detach()) if "accuracy" in metrics else float("nan"),
            "params": sum(v.numel() for v in params.values())}


def worker_main(spec: str) -> int:
    """Run the case of the JSON job ``spec`` (what :func:`run_isolated` passes to ``python -m metafunc.bench``):
    the gradient to the job's file, the rest as one JSON line on stdout (``{"error": ...}`` when out of memory).

    Example:
        >>> worker_main('{"config": {"model": "mlp"}}')
        Traceback (most recent call last):
        ...
        ValueError: metafunc bench: a worker job needs the keys ['config', 'grad_file', 'path', 'rss', 'steps'] (got ['config'])
    """
    job = json.loads(spec)
    keys = ["config", "grad_file", "path", "rss", "steps"]
    if not isinstance(job, dict) or sorted(job) != keys:
        raise ValueError(f"metafunc bench: a worker job needs the keys {keys} (got {sorted(job)})")
    try:
        out = run_case(BenchConfig(**job["config"]), job["path"], job["steps"], measure_rss=job["rss"])
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:  # type: ignore[attr-defined]
        print(json.dumps({"error": f"out of memory ({type(e).__name__})"}))
        return 0
    torch.save(out.pop("grad"), job["grad_file"])
    print(strict_json(out))
    return 0


def run_isolated(cfg: BenchConfig, path: str, steps: int, rss: bool) -> dict[str, Any]:
    """:func:`run_case` in a fresh subprocess (peak RSS then counts this case alone); a case that fails or is killed
    comes back as ``{"error": ...}``.

    Example:
        >>> out = run_isolated(BenchConfig(model="mlp", meta_batch=1, repeats=1, warmup=0), "exact", 1, rss=True)
        >>> out["peak_bytes"] > 0, sorted(out["grad"])[-1]
        (True, 'head.weight')
    """
    fd, grad_file = tempfile.mkstemp(suffix=".pt", prefix="metafunc-bench-")
    os.close(fd)
    try:
        job = json.dumps({"config": asdict(cfg), "path": path, "steps": steps, "rss": rss, "grad_file": grad_file})
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        proc = subprocess.run([sys.executable, "-m", "metafunc.bench", job], capture_output=True, text=True, env=env)
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
