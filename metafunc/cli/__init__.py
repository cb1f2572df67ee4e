"""The ``metafunc`` command: ``train``, ``evaluate`` and ``bench``.

``metafunc train`` with no arguments meta-trains MAML on sinusoid regression (the MAML paper's setting), compares it
with a baseline pretrained on all tasks jointly, prints a table and saves the figures. ``metafunc train --dataset
omniglot --data-root DIR`` trains a few-shot classifier; ``--algorithm`` takes any learner of
:data:`metafunc.LEARNERS`, whose options are flags. ``metafunc evaluate OUT/checkpoint.pt`` reports the test accuracy
over 600 episodes with its 95% confidence interval. The commands live in :mod:`metafunc.cli.train`,
:mod:`metafunc.cli.evaluate` and :mod:`metafunc.cli.bench`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from metafunc.cli.options import add_learner_option_flags, load_config_file, train_config_from_args
from metafunc.registry import LEARNERS

__all__ = ["main", "build_parser", "load_config_file", "train_config_from_args"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``metafunc`` command (subcommands ``train``, ``evaluate``, ``bench``).

    Example:
        >>> args = build_parser().parse_args(["train", "--algorithm", "fomaml", "--shots", "5"])
        >>> args.algorithm, args.shots
        ('fomaml', 5)
    """
    parser = argparse.ArgumentParser(prog="metafunc", description="Meta-learning on torch.func.")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,bench}")
    sub.required = True
    _add_train_command(sub)
    _add_evaluate_command(sub)
    sub.add_parser("bench", help="benchmarks (metafunc.bench), arguments passed through", add_help=False)
    return parser


def _add_train_command(sub: Any) -> None:
    t = sub.add_parser("train", help="meta-train (no arguments: MAML on sinusoid regression vs a pretrained baseline)",
                       description="Meta-train a learner. Settings come from the dataset defaults, then --config, "
                                   "then the flags given here. Exit status: 0 done; 1 a rank died or hung (torchrun); "
                                   "2 bad settings; 3 the meta-loss or meta-gradient stopped being finite; 4 a "
                                   "checkpoint could not be written (the previous one is kept); 75 stopped by "
                                   "SIGTERM/SIGINT/SIGUSR1 after writing a checkpoint (restart with --resume).")
    t.add_argument("--config", help="JSON or TOML file of settings (flags given here override it)")
    _add_learner_and_data_flags(t)
    _add_episode_and_optimiser_flags(t)
    _add_run_flags(t)
    add_learner_option_flags(t)


def _add_learner_and_data_flags(t: argparse.ArgumentParser) -> None:
    from metafunc.train.datasets import DATASETS

    t.add_argument("--algorithm", choices=list(LEARNERS), metavar="{" + ",".join(LEARNERS) + "}",
                   help="the learner, from metafunc.LEARNERS (default maml): " +
                        "; ".join(f"{n}: {s.description}" for n, s in LEARNERS.items()))
    t.add_argument("--dataset", metavar="NAME|module:factory",
                   help="a registered dataset (" + ", ".join(DATASETS) + "; default sinusoid), or module:factory "
                        "naming your own factory of task sources by split (see docs/your-own-model.md)")
    t.add_argument("--model", metavar="module:factory",
                   help="your own network: a factory returning an nn.Module (given ways=N if it takes it; norm "
                        "layers made exact); default: the dataset's network")
    t.add_argument("--data-root", help="folder with the data set's files (default $METAFUNC_DATA/omniglot, /cifar100, "
                                       "/mini_imagenet or /tiered_imagenet)")
    t.add_argument("--download", action="store_true",
                   help="omniglot: fetch the official zips into --data-root first (md5-checked) if they are missing")
    t.add_argument("--backbone", choices=("conv4", "resnet12"),
                   help="network of the image benchmarks: conv4 (default) or resnet12 (64-160-320-640)")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop and flip of the training episodes on the device (image benchmarks; default on "
                        "for metric learners)")


def _add_episode_and_optimiser_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument("--ways", type=int, help="classes per task (omniglot default 5)")
    t.add_argument("--val-ways", type=int, help="classes per validation task (default: --ways, or all the "
                                                "validation split's classes when it has fewer)")
    t.add_argument("--shots", type=int, help="support examples per class (sinusoid: support points K, default 10)")
    t.add_argument("--val-shots", type=int, help="support examples per class of the validation tasks (default "
                                                 "--shots; Reptile trains at more shots than it is tested at)")
    t.add_argument("--val-queries", type=int, help="query examples per class of the validation tasks (default "
                                                   "--queries)")
    t.add_argument("--queries", type=int, help="query examples per class (omniglot default 15)")
    t.add_argument("--meta-batch", type=int, help="tasks per meta-step (sinusoid 25, omniglot 32)")
    t.add_argument("--inner-steps", type=int, help="inner SGD steps in training (default 1)")
    t.add_argument("--eval-inner-steps", type=int, help="inner steps at validation (sinusoid 10, omniglot 3)")
    t.add_argument("--inner-lr", type=float, help="inner learning rate (sinusoid 0.01, omniglot 0.4)")
    t.add_argument("--outer-lr", type=float, help="learning rate of the meta-update (default 1e-3)")
    t.add_argument("--outer-optimizer", choices=("adam", "sgd"),
                   help="the meta-update: adam (default) or sgd (Reptile's interpolation step: --outer-lr 1 moves the "
                        "initialisation to the mean adapted weights)")
    t.add_argument("--outer-lr-schedule", choices=("constant", "linear", "cosine"),
                   help="constant (default); linear: anneal --outer-lr to 0 over the run (over --time-budget when "
                        "given), as Reptile does; cosine: along half a cosine to 1%% of it, as MAML++ does")
    t.add_argument("--epoch-length", type=int, help="meta-iterations per epoch of learners annealed by epoch "
                                                    "(MAML++'s multi-step loss and derivative order; default 500)")
    t.add_argument("--iterations", "--steps", dest="iterations", type=int,
                   help="meta-iterations (sinusoid 70000, the MAML paper's budget; omniglot 2000)")
    t.add_argument("--val-every", type=int, help="validate every N iterations (0: only at the end)")
    t.add_argument("--val-episodes", type=int, help="validation episodes (default 100)")
    t.add_argument("--checkpoint-every", type=int, help="write OUT/checkpoint.pt every N iterations (and at the end)")
    t.add_argument("--width", type=int, help="filters of the Conv-4 (default 64)")


def _add_run_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument("--mode", choices=("auto", "vmap", "loop"),
                   help="how a meta-batch runs: auto (the default: the fastest of loop, threads, vmap and vmap "
                        "chunks, timed before training and kept in the checkpoint), loop or vmap")
    t.add_argument("--chunk-size", type=int, help="vmap this many tasks at a time (memory)")
    t.add_argument("--workers", type=int, help="tasks at once in the CPU loop, one thread each (default: auto "
                                                "measures 1 and 2; two at once peak higher)")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="images and convolution weights in channels-last format in the loop (default: auto measures "
                        "both on a CPU)")
    t.add_argument("--threads", type=int, help="torch CPU threads (sinusoid default 1: tiny matrices)")
    t.add_argument("--device", help="cpu (default), cuda, cuda:1, ...")
    t.add_argument("--seed", type=int, help="seed of the initial weights and of the task stream (default 0)")
    t.add_argument("--out", help="output folder (default runs/DATASET_ALGORITHM)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from OUT/checkpoint.pt (or CHECKPOINT) exactly where it stopped")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (its checkpoints and metrics are deleted); without it, or --resume, "
                        "a folder holding a run is refused")
    t.add_argument("--eval-episodes", type=int, default=600, help="held-out tasks of the sinusoid comparison")
    t.add_argument("--no-baseline", action="store_true", help="sinusoid: skip the pretrained baseline comparison")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="under torchrun: a rank that dies or hangs stops the others within this many seconds "
                        "(default 300)")
    t.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="train for this many seconds of meta-steps (sampling, validation and checkpoints excluded), "
                        "then checkpoint and stop; --iterations becomes an upper bound; --resume continues with what "
                        "is left of the budget")
    t.add_argument("--on-nonfinite", choices=("stop", "skip"),
                   help="a NaN/inf meta-loss or meta-gradient: stop (default; exit status 3, the last good checkpoint "
                        "kept) or skip that step (logged in metrics.jsonl)")
    t.add_argument("--max-nonfinite", type=int, metavar="N",
                   help="with --on-nonfinite skip: stop (exit status 3) once N steps were skipped (default 10)")
    t.add_argument("--dist-backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="under torchrun: auto (default) picks NCCL for a CUDA --device and gloo otherwise")


def _add_evaluate_command(sub: Any) -> None:
    e = sub.add_parser("evaluate", help="test accuracy (or MSE) of a checkpoint over many episodes, with 95%% CI",
                       description="Evaluate a checkpoint on test episodes: mean and 95%% CI = 1.96*std/sqrt(n).")
    e.add_argument("checkpoint", help="a checkpoint written by metafunc train (OUT/checkpoint.pt)")
    e.add_argument("--episodes", type=int, default=600, help="test episodes (default 600)")
    e.add_argument("--ways", type=int, help="classes per task (default: as trained)")
    e.add_argument("--shots", type=int, help="support examples per class (default: as trained)")
    e.add_argument("--queries", type=int, help="query examples per class (default: as trained)")
    e.add_argument("--inner-steps", type=int, help="test-time inner steps (default: the run's eval_inner_steps)")
    e.add_argument("--new-head", choices=("zero", "prototypes"),
                   help="at other ways than trained: a zero output layer adapted in the inner loop, or one initialised "
                        "from the support prototypes (default zero)")
    e.add_argument("--inner-loop", choices=("learner", "sgd"), default="learner",
                   help="test-time adaptation: the learner's own inner loop (default), or plain gradient descent on "
                        "every parameter from the meta-parameters (iMAML's authors' test protocol, lambda = 0)")
    e.add_argument("--split", choices=("test", "val"), default="test", help="which split to draw episodes from")
    e.add_argument("--data-root", help="folder with the Omniglot zips (default: as trained)")
    e.add_argument("--device", help="device (default: as trained)")
    e.add_argument("--seed", type=int, default=0, help="seed of the test episodes (default 0)")
    e.add_argument("--meta-batch", type=int, default=25, help="episodes evaluated at once (default 25)")
    e.add_argument("--json", help="also write the result to this JSON file")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_bench(argv: list[str]) -> int:
    try:
        from metafunc.cli.bench import main as bench_main
    except ImportError as e:
        print(f"metafunc bench: the benchmark module metafunc.cli.bench is not available ({e}); install metafunc from a "
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
            from metafunc.cli.train import run_train
            return run_train(args)
        from metafunc.cli.evaluate import run_evaluate
        return run_evaluate(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        msg = str(e)
        for prefix in (f"metafunc {args.command}: ", "train: "):
            msg = msg.removeprefix(prefix)
        print(f"metafunc {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
