"""The ``metafunc`` command: ``train``, ``evaluate`` and ``bench``.

``metafunc train`` with no arguments meta-trains MAML on sinusoid regression (the MAML paper's setting), compares it
with a baseline pretrained on all tasks jointly, prints a table and saves the figures. ``metafunc train --dataset
omniglot --data-root DIR`` trains a few-shot classifier; ``metafunc evaluate OUT/checkpoint.pt`` reports the test
accuracy over 600 episodes with its 95% confidence interval.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser", "load_config_file", "train_config_from_args"]

_ALIASES = {"steps": "iterations"}


def _field_names() -> set[str]:
    from .training import TrainConfig
    import dataclasses
    return {f.name for f in dataclasses.fields(TrainConfig)}


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run configuration from JSON (``.json``) or TOML (``.toml``); keys are :class:`TrainConfig` fields
    (``meta_batch`` or ``meta-batch``; ``steps`` means ``iterations``).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "cfg.json")
        >>> _ = open(p, "w").write('{"algorithm": "fomaml", "meta-batch": 4}')
        >>> load_config_file(p)
        {'algorithm': 'fomaml', 'meta_batch': 4}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metafunc train: config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, tomllib.TOMLDecodeError
        raise ValueError(f"metafunc train: cannot parse config file {str(path)!r} "
                         f"({'TOML' if path.suffix.lower() == '.toml' else 'JSON'}): {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"metafunc train: config file {str(path)!r} must hold a table/object of settings "
                         f"(got {type(data).__name__})")
    fields = _field_names()
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if name not in fields:
            raise ValueError(f"metafunc train: unknown setting {key!r} in {str(path)!r}; known settings: "
                             f"{', '.join(sorted(fields))}")
        out[name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``metafunc`` command (subcommands ``train``, ``evaluate``, ``bench``).

    Example:
        >>> args = build_parser().parse_args(["train", "--algorithm", "fomaml", "--shots", "5"])
        >>> args.algorithm, args.shots
        ('fomaml', 5)
    """
    from .training import ALGORITHMS, DATASETS

    parser = argparse.ArgumentParser(prog="metafunc", description="Meta-learning on torch.func.")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,bench}")
    sub.required = True

    t = sub.add_parser("train", help="meta-train (no arguments: MAML on sinusoid regression vs a pretrained baseline)",
                       description="Meta-train a learner. Settings come from the dataset defaults, then --config, "
                                   "then the flags given here.")
    t.add_argument("--config", help="JSON or TOML file of settings (flags given here override it)")
    t.add_argument("--algorithm", choices=sorted(ALGORITHMS), help="meta-learning algorithm (default maml)")
    t.add_argument("--dataset", choices=DATASETS, help="sinusoid (default), omniglot, or synthetic (smoke tests)")
    t.add_argument("--data-root", help="folder with the Omniglot zips (default $METAFUNC_DATA/omniglot)")
    t.add_argument("--ways", type=int, help="classes per task (omniglot default 5)")
    t.add_argument("--shots", type=int, help="support examples per class (sinusoid: support points K, default 10)")
    t.add_argument("--queries", type=int, help="query examples per class (omniglot default 15)")
    t.add_argument("--meta-batch", type=int, help="tasks per meta-step (sinusoid 25, omniglot 32)")
    t.add_argument("--inner-steps", type=int, help="inner SGD steps in training (default 1)")
    t.add_argument("--eval-inner-steps", type=int, help="inner steps at validation (sinusoid 10, omniglot 3)")
    t.add_argument("--inner-lr", type=float, help="inner learning rate (sinusoid 0.01, omniglot 0.4)")
    t.add_argument("--outer-lr", type=float, help="Adam learning rate of the meta-update (default 1e-3)")
    t.add_argument("--iterations", "--steps", dest="iterations", type=int,
                   help="meta-iterations (sinusoid 4000, omniglot 2000)")
    t.add_argument("--val-every", type=int, help="validate every N iterations (0: only at the end)")
    t.add_argument("--val-episodes", type=int, help="validation episodes (default 100)")
    t.add_argument("--checkpoint-every", type=int, help="write OUT/checkpoint.pt every N iterations (and at the end)")
    t.add_argument("--width", type=int, help="filters of the Conv-4 (default 64)")
    t.add_argument("--mode", choices=("auto", "vmap", "loop"),
                   help="meta-batch over tasks: vmap (sinusoid default), loop, or auto (loop on CPU, vmap on GPU; "
                        "the classification default)")
    t.add_argument("--chunk-size", type=int, help="vmap this many tasks at a time (memory)")
    t.add_argument("--threads", type=int, help="torch CPU threads (sinusoid default 1: tiny matrices)")
    t.add_argument("--device", help="cpu (default), cuda, cuda:1, ...")
    t.add_argument("--seed", type=int, help="seed of the initial weights and of the task stream (default 0)")
    t.add_argument("--out", help="output folder (default runs/DATASET_ALGORITHM)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from OUT/checkpoint.pt (or CHECKPOINT) exactly where it stopped")
    t.add_argument("--eval-episodes", type=int, default=600, help="held-out tasks of the sinusoid comparison")
    t.add_argument("--no-baseline", action="store_true", help="sinusoid: skip the pretrained baseline comparison")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="under torchrun: a rank that dies or hangs stops the others within this many seconds "
                        "(default 300)")
    t.add_argument("--dist-backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="under torchrun: auto (default) picks NCCL for a CUDA --device and gloo otherwise")

    e = sub.add_parser("evaluate", help="test accuracy (or MSE) of a checkpoint over many episodes, with 95% CI",
                       description="Evaluate a checkpoint on test episodes: mean and 95% CI = 1.96*std/sqrt(n).")
    e.add_argument("checkpoint", help="a checkpoint written by metafunc train (OUT/checkpoint.pt)")
    e.add_argument("--episodes", type=int, default=600, help="test episodes (default 600)")
    e.add_argument("--ways", type=int, help="classes per task (default: as trained)")
    e.add_argument("--shots", type=int, help="support examples per class (default: as trained)")
    e.add_argument("--queries", type=int, help="query examples per class (default: as trained)")
    e.add_argument("--inner-steps", type=int, help="test-time inner steps (default: the run's eval_inner_steps)")
    e.add_argument("--split", choices=("test", "val"), default="test", help="which split to draw episodes from")
    e.add_argument("--data-root", help="folder with the Omniglot zips (default: as trained)")
    e.add_argument("--device", help="device (default: as trained)")
    e.add_argument("--seed", type=int, default=0, help="seed of the test episodes (default 0)")
    e.add_argument("--meta-batch", type=int, default=25, help="episodes evaluated at once (default 25)")
    e.add_argument("--json", help="also write the result to this JSON file")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser("bench", help="benchmarks (metafunc.bench), arguments passed through", add_help=False)
    return parser


def train_config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None):
    """Merge settings: ``base`` (a checkpoint's config), then ``--config``, then the flags that were given.

    Example:
        >>> args = build_parser().parse_args(["train", "--shots", "5"])
        >>> train_config_from_args(args).shots
        5
    """
    from .training import TrainConfig

    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for name in _field_names():
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    values = {k: v for k, v in values.items() if k in _field_names()}
    return TrainConfig(**values)


def _cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .training import (default_is_main, plot_sinusoid_adaptation, pretrain_baseline, resolve_config,
                           sinusoid_comparison, train)

    resume = args.resume
    cfg = train_config_from_args(args)
    if resume:
        ckpt_path = Path(resume) if resume is not True else Path(resolve_config(cfg).out) / "checkpoint.pt"
        saved = load_checkpoint(ckpt_path)["config"]
        if args.out is None:
            saved["out"] = str(ckpt_path.parent)
        cfg = train_config_from_args(args, base=saved)
        resume = ckpt_path
    cfg = resolve_config(cfg)
    if cfg.threads is not None:
        import torch
        torch.set_num_threads(cfg.threads)
    is_main = default_is_main()
    progress = not args.no_progress
    from . import distributed

    dist_kwargs: dict[str, Any] = {}
    try:
        if os.environ.get("WORLD_SIZE"):  # launched by torchrun (or any launcher that sets RANK, WORLD_SIZE, ...)
            world_size = int(os.environ["WORLD_SIZE"])
            if cfg.meta_batch < world_size:  # checked before the rendezvous, so every rank says it at once
                raise ValueError(f"metafunc train: --meta-batch {cfg.meta_batch} is smaller than the {world_size} "
                                 "processes; every process needs at least one task")
            info = distributed.init_distributed(backend=args.dist_backend, timeout=args.dist_timeout,
                                                device=cfg.device.split(":")[0])
            if info.device.type == "cuda":
                cfg = resolve_config(dataclasses.replace(cfg, device=str(info.device)))  # rank i: cuda:LOCAL_RANK
            is_main = info.is_main
            dist_kwargs = dict(meta_gradient_fn=distributed.distributed_meta_gradient, train_source=lambda src:
                               distributed.ShardedSource(src, rank=info.rank, world_size=info.world_size))
            if is_main and info.distributed:
                print(f"metafunc train: {info.world_size} processes ({info.backend}), meta-batch {cfg.meta_batch} "
                      f"split {distributed.shard_sizes(cfg.meta_batch, info.world_size)}, timeout "
                      f"{info.timeout:g} s")
        if is_main:
            print(f"metafunc train: {cfg.algorithm} on {cfg.dataset}, {cfg.iterations} iterations, meta-batch "
                  f"{cfg.meta_batch}, inner lr {cfg.inner_lr} x {cfg.inner_steps} step(s), Adam {cfg.outer_lr}, "
                  f"device {cfg.device}, out {cfg.out}" + (f" (resuming from {resume})" if resume else ""))
        result = train(cfg, resume=resume, is_main=is_main, progress=progress, **dist_kwargs)
    except distributed.DistributedError as e:  # a rank died or hung: say so, exit non-zero (checkpoint intact)
        print(f"metafunc train: error: {e}", file=sys.stderr, flush=True)
        import torch.distributed as torch_distributed

        if torch_distributed.is_available() and torch_distributed.is_initialized():
            # The broken process group's destructor can abort (SIGABRT) at interpreter exit; leave now, with the
            # status that says what happened (the checkpoint on disk is complete: it is written atomically).
            sys.stdout.flush()
            os._exit(1)
        return 1
    distributed.shutdown_distributed()
    if not is_main:
        return 0
    out = result.out
    print(f"trained {cfg.iterations} iterations in {result.seconds:.1f} s; checkpoint {out / 'checkpoint.pt'}, "
          f"metrics {out / 'metrics.jsonl'}, learning curve {out / 'learning_curve.png'}")
    if cfg.dataset == "sinusoid" and not args.no_baseline:
        baseline = pretrain_baseline(cfg, progress=progress)
        comparison = sinusoid_comparison(result, baseline, episodes=args.eval_episodes)
        print(comparison.table())
        (out / "sinusoid_results.json").write_text(json.dumps(comparison.as_dict(), indent=2) + "\n")
        fig = plot_sinusoid_adaptation(result, baseline, out / "sinusoid_adaptation.png")
        print(f"results {out / 'sinusoid_results.json'}, figure {fig}")
    else:
        val = [r for r in result.records if r.get("split") == "val"]
        if val:
            metric = "accuracy" if "accuracy" in val[-1] else "mse"
            print(f"validation {metric} at iteration {val[-1]['iteration']}: {val[-1][metric]:.4f} +- "
                  f"{val[-1][metric + '_ci95']:.4f} ({val[-1]['episodes']} episodes, {val[-1]['inner_steps']} steps)")
        print(f"test it with: metafunc evaluate {out / 'checkpoint.pt'} --episodes 600")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import check_compatible, load_checkpoint
    from .evaluation import BATCHNORM_PROTOCOL, evaluate_episodes
    from .training import ALGORITHMS, TrainConfig, build_experiment, resolve_config

    ckpt = load_checkpoint(args.checkpoint)
    saved = dict(ckpt.get("config") or {})
    if not saved:
        raise ValueError(f"metafunc evaluate: {args.checkpoint!r} holds no run configuration; it was not written "
                         "by metafunc train")
    for name in ("ways", "shots", "queries", "data_root", "device"):
        v = getattr(args, name)
        if v is not None:
            saved[name] = v
    if args.inner_steps is not None:
        saved["eval_inner_steps"] = args.inner_steps
    cfg = resolve_config(TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}))
    trained_ways = (ckpt.get("config") or {}).get("ways")
    if ALGORITHMS[cfg.algorithm].needs_head and cfg.ways != trained_ways and cfg.dataset != "sinusoid":
        raise ValueError(f"metafunc evaluate: the checkpoint was trained {trained_ways}-way (its head has "
                         f"{trained_ways} outputs) and cannot be evaluated {cfg.ways}-way with {cfg.algorithm}; "
                         f"pass --ways {trained_ways} or train a {cfg.ways}-way model")
    exp = build_experiment(cfg)
    check_compatible(ckpt, exp.params, caller="metafunc evaluate")
    params = {k: ckpt["params"][k].to(cfg.device) for k in exp.params}
    gen = torch.Generator(device=cfg.device).manual_seed(args.seed)
    result = evaluate_episodes(exp.learner, params, exp.sources[args.split], episodes=args.episodes,
                               steps=cfg.eval_inner_steps, classification=exp.classification, generator=gen,
                               batch=args.meta_batch, mode=cfg.mode, progress=not args.no_progress)
    if exp.classification:
        setting = f"{cfg.ways}-way {cfg.shots}-shot, {cfg.queries} queries per class"
    else:
        setting = f"sinusoid regression, K={cfg.shots} support points, 100 query points"
    print(f"checkpoint {args.checkpoint}: {cfg.algorithm} on {cfg.dataset}, {ckpt.get('iteration')} iterations")
    adaptation = ("no inner loop" if cfg.algorithm in ("protonet", "matching_net")
                  else f"{cfg.eval_inner_steps} inner steps (lr {cfg.inner_lr})")
    print(f"{setting}, {adaptation}, {args.episodes} {args.split} episodes")
    print(result.format() + "  [95% CI = 1.96 * std / sqrt(n)]")
    print(f"BatchNorm protocol: {BATCHNORM_PROTOCOL}")
    if args.json:
        record = {**result.as_dict(), "checkpoint": str(args.checkpoint), "split": args.split, "ways": cfg.ways,
                  "shots": cfg.shots, "queries": cfg.queries, "algorithm": cfg.algorithm, "dataset": cfg.dataset,
                  "batchnorm": BATCHNORM_PROTOCOL}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _cmd_bench(argv: list[str]) -> int:
    try:
        from .bench import main as bench_main
    except ImportError as e:
        print(f"metafunc bench: the benchmark module metafunc.bench is not available ({e}); install metafunc from a "
              "full checkout, or run the benchmarks with `python -m pytest benchmarks/`", file=sys.stderr)
        return 2
    return int(bench_main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``metafunc`` command with ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Errors in the settings (a bad value, a missing data folder, a file that is not a checkpoint) are printed as
    ``metafunc COMMAND: error: ...`` with exit status 2.

    Example:
        >>> main(["train", "--dataset", "synthetic", "--iterations", "2", "--out", "/tmp/mf", "--no-progress"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _cmd_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _cmd_train(args)
        return _cmd_evaluate(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        msg = str(e)
        if msg.startswith(f"metafunc {args.command}: "):
            msg = msg[len(f"metafunc {args.command}: "):]
        print(f"metafunc {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
