"""``metafunc bench``: time, memory and accuracy of every gradient path on a model, in one table.

The flags become a :class:`metafunc.bench.BenchConfig`; :func:`metafunc.bench.run_bench` runs every case (see
:mod:`metafunc.bench` for what is measured and how); this module prints the table and writes the JSON and the plot.

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
import math
import os
import sys
from dataclasses import asdict
from typing import Any, Sequence

import torch

from metafunc._shared import atomic_write_text, strict_json
from metafunc.bench import MEMORY_METHODS, BenchConfig, check_cases, format_table, memory_method, plot_rows, run_bench
from metafunc.cli.options import add_learner_option_flags, learner_options_from_args
from metafunc.registry import LEARNERS, path_names

__all__ = ["main", "build_parser"]


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
    p.add_argument("--mode", default="auto", choices=["auto", "vmap", "loop"],
                   help="how the meta-batch runs: auto (default, as metafunc train) measures the loop, vmap and vmap "
                        "chunks on untimed meta-steps and keeps the fastest, shown in the table's last column")
    p.add_argument("--memory", default="auto", choices=list(MEMORY_METHODS),
                   help="auto: CUDA allocator peak on a GPU, peak RSS of a subprocess per case on a CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the configuration and the rows to this JSON file")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--plot", default=None, help="save time and memory against k to this image (matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_learner_option_flags(p)
    return p


def _check_device(args: argparse.Namespace) -> None:
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ValueError(f"metafunc bench: --device must be cpu, cuda or cuda:N (got {args.device!r})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("metafunc bench: --device cuda but torch.cuda.is_available() is False on this machine; "
                         "use --device cpu")
    if args.memory == "cuda" and not args.device.startswith("cuda"):
        raise ValueError("metafunc bench: --memory cuda needs --device cuda; use --memory rss on a CPU")
    if args.memory == "rss" and args.device.startswith("cuda"):
        raise ValueError("metafunc bench: --memory rss measures host memory; use --memory cuda on a GPU")


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
    _check_device(args)
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


def _report(cfg: BenchConfig, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Print the header lines and the table; write the JSON and the plot that ``args`` asks for."""
    method = memory_method(cfg)
    device = torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda") else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    memory_note = {"cuda": "CUDA allocator peak above the allocation before the step",
                   "rss": "peak RSS of a fresh subprocess above its RSS before the step",
                   "none": "not measured"}[method]
    print(f"metafunc bench: model={cfg.model} meta-batch={cfg.meta_batch} ways={cfg.ways} shots={cfg.shots} "
          f"query={cfg.query} dtype={cfg.dtype} mode={cfg.mode} device={device} torch={torch.__version__}")
    print(f"time: median of {cfg.repeats} meta-steps (forward + backward) after {cfg.warmup} warm-up"
          f"{' and auto measuring its plans' if cfg.mode == 'auto' else ''}; memory: {memory_note}")
    print(format_table(rows, markdown=args.markdown))
    if args.json:
        atomic_write_text(args.json, strict_json({"config": asdict(cfg), "device": device, "torch": torch.__version__,
                                                  "memory_method": method, "rows": rows}, indent=2))
    if args.plot:
        plot_rows(rows, args.plot, f"{cfg.model}, meta-batch {cfg.meta_batch}, {device}")


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
    try:
        cfg = _config_from_args(args)
        check_cases(cfg)  # eager checks of the model and of every path's options
    except (ValueError, TypeError) as e:
        print(str(e) if str(e).startswith("metafunc bench") else f"metafunc bench: {e}", file=sys.stderr)
        return 2
    _report(cfg, run_bench(cfg, progress=not args.quiet), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
