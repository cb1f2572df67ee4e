"""The meta-training loop behind ``metafunc train``: generic over a task source, a model and a learner.

The pieces, each replaceable:

* a **task source**: anything with ``sample(meta_batch, generator) -> Task`` (:class:`SinusoidSource`,
  :class:`GaussianClassification`, ``metafunc.data.EpisodeSampler``);
* a **learner** from the algorithm registry (:func:`register_algorithm`, :data:`ALGORITHMS`);
* the **meta-gradient step** :func:`meta_gradient` (``(batched_loss, params, tasks) -> (loss, metrics)`` leaving the
  meta-gradient in ``.grad``), which a distributed run replaces by one that all-reduces the gradients;
* a **rank flag** ``is_main``: only the main process writes ``metrics.jsonl``, checkpoints and plots.

A run is fully determined by its :class:`TrainConfig`; its checkpoint stores the meta-parameters, the optimizer state
and the generator states, so ``train(config, resume=True)`` continues bit for bit where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import Tensor, nn

from . import models
from ._types import Metrics, ModelFn, Params, Task
from ._validation import check_choice, check_positive, check_steps
from .algorithms import (MetaLearner, anil, boil, fo_proto_maml, fomaml, maml, matching_net, meta_sgd, proto_maml,
                         protonet, reptile)
from .batching import meta_batch as meta_batch_transform
from .checkpoint import check_compatible, load_checkpoint, save_checkpoint
from .evaluation import EvalResult, TaskSource, evaluate_episodes
from .functional import functionalize
from .sinusoid import sinusoid_tasks

__all__ = [
    "TrainConfig", "TrainResult", "AlgorithmSpec", "ALGORITHMS", "DATASETS", "DATASET_DEFAULTS", "RESUME_KEYS",
    "register_algorithm", "resolve_config", "SinusoidSource", "GaussianClassification", "Experiment",
    "build_experiment", "meta_gradient", "train", "plot_learning_curve", "default_is_main", "checkpoint_state",
    "restore_checkpoint", "SinusoidComparison", "pretrain_baseline", "sinusoid_comparison",
    "plot_sinusoid_adaptation", "SINUSOID_EVAL_STEPS",
]

DATASETS = ("sinusoid", "omniglot", "synthetic")
"""``sinusoid``: MAML regression; ``omniglot``: the official zips (``metafunc.data``); ``synthetic``: Gaussian
clusters in feature space (a fast classification source for tests and smoke runs)."""

DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # The MAML paper's sinusoid setting: 40-40 ReLU MLP, K=10, alpha=0.01, 1 step, 25 tasks, Adam 1e-3.
    "sinusoid": dict(shots=10, queries=10, meta_batch=25, inner_steps=1, eval_inner_steps=10, inner_lr=0.01,
                     outer_lr=1e-3, iterations=4000, val_every=500, val_episodes=100, checkpoint_every=1000,
                     threads=1, mode="vmap"),
    # The MAML paper's Omniglot setting: meta-batch 32, alpha=0.4, 1 step in training and 3 at test, Adam 1e-3.
    "omniglot": dict(ways=5, shots=1, queries=15, meta_batch=32, inner_steps=1, eval_inner_steps=3, inner_lr=0.4,
                     outer_lr=1e-3, iterations=2000, val_every=200, val_episodes=100, checkpoint_every=200,
                     mode="auto"),
    "synthetic": dict(ways=5, shots=1, queries=5, meta_batch=8, inner_steps=1, eval_inner_steps=3, inner_lr=0.4,
                      outer_lr=1e-3, iterations=200, val_every=50, val_episodes=40, checkpoint_every=50, width=16,
                      mode="auto"),
}

RESUME_KEYS = ("algorithm", "dataset", "ways", "shots", "queries", "meta_batch", "inner_steps", "inner_lr",
               "outer_lr", "seed", "width", "mode")
"""Settings that must be equal between a checkpoint and the run that resumes it (``iterations`` may grow)."""


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; ``None`` fields take the dataset's defaults (:data:`DATASET_DEFAULTS`).

    Example:
        >>> cfg = resolve_config(TrainConfig(dataset="omniglot"))
        >>> cfg.meta_batch, cfg.inner_lr, cfg.inner_steps, cfg.eval_inner_steps
        (32, 0.4, 1, 3)
    """

    algorithm: str = "maml"
    dataset: str = "sinusoid"
    data_root: str | None = None
    ways: int | None = None
    shots: int | None = None
    queries: int | None = None
    meta_batch: int | None = None
    inner_steps: int | None = None
    eval_inner_steps: int | None = None
    inner_lr: float | None = None
    outer_lr: float | None = None
    iterations: int | None = None
    val_every: int | None = None
    val_episodes: int | None = None
    checkpoint_every: int | None = None
    width: int | None = None
    mode: str | None = None
    chunk_size: int | None = None
    threads: int | None = None
    device: str = "cpu"
    seed: int = 0
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the settings."""
        return dataclasses.asdict(self)


class AlgorithmSpec(NamedTuple):
    """How the trainer builds a learner: ``build(model, config) -> MetaLearner``; ``needs_head=False`` means the
    model is an encoder without an output layer (metric learners).

    Example:
        >>> from metafunc import functionalize, maml, models
        >>> spec = AlgorithmSpec(lambda model, cfg: maml(model, inner_lr=cfg.inner_lr, steps=2, loss="mse"))
        >>> spec.needs_head, ALGORITHMS["protonet"].needs_head
        (True, False)
        >>> model, params = functionalize(models.mlp())
        >>> learner = spec.build(model, resolve_config(TrainConfig()))
        >>> learner.name, learner.second_order
        ('maml', True)
    """

    build: Callable[[ModelFn, TrainConfig], MetaLearner]
    needs_head: bool = True


def _gradient_spec(factory: Callable[..., MetaLearner]) -> AlgorithmSpec:
    def build(model: ModelFn, cfg: TrainConfig) -> MetaLearner:
        loss = "mse" if cfg.dataset == "sinusoid" else "cross_entropy"
        return factory(model, inner_lr=cfg.inner_lr, steps=cfg.inner_steps, loss=loss)

    return AlgorithmSpec(build, True)


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "maml": _gradient_spec(maml),
    "fomaml": _gradient_spec(fomaml),
    "anil": _gradient_spec(anil),
    "boil": _gradient_spec(boil),
    "meta_sgd": _gradient_spec(meta_sgd),
    "reptile": _gradient_spec(reptile),
    "protonet": AlgorithmSpec(lambda m, c: protonet(m, ways=c.ways), False),
    "matching_net": AlgorithmSpec(lambda m, c: matching_net(m, ways=c.ways), False),
    "proto_maml": AlgorithmSpec(lambda m, c: proto_maml(m, inner_lr=c.inner_lr, steps=c.inner_steps, ways=c.ways),
                                False),
    "fo_proto_maml": AlgorithmSpec(
        lambda m, c: fo_proto_maml(m, inner_lr=c.inner_lr, steps=c.inner_steps, ways=c.ways), False),
}
"""The algorithms ``metafunc train --algorithm`` knows; add one with :func:`register_algorithm`."""


def register_algorithm(name: str, build: Callable[[ModelFn, TrainConfig], MetaLearner], *,
                       needs_head: bool = True) -> None:
    """Make ``metafunc train --algorithm NAME`` build a learner with ``build(model, config)``.

    Example:
        >>> from metafunc import maml
        >>> register_algorithm("maml_3step", lambda model, cfg: maml(model, inner_lr=cfg.inner_lr, steps=3,
        ...                    loss="mse" if cfg.dataset == "sinusoid" else "cross_entropy"))
        >>> "maml_3step" in ALGORITHMS
        True
        >>> del ALGORITHMS["maml_3step"]
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_algorithm: name must be an identifier such as 'my_maml' (got {name!r})")
    if not callable(build):
        raise TypeError(f"register_algorithm: build must be callable as build(model, config) (got {type(build).__name__})")
    ALGORITHMS[name] = AlgorithmSpec(build, bool(needs_head))


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill ``None`` fields with the dataset's defaults and validate every setting (errors name the flag).

    Example:
        >>> resolve_config(TrainConfig()).iterations
        4000
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train: config must be a TrainConfig (got {type(config).__name__})")
    check_choice("train", "dataset", config.dataset, DATASETS)
    if config.algorithm not in ALGORITHMS:
        raise ValueError(f"train: unknown algorithm {config.algorithm!r}; choose one of {', '.join(sorted(ALGORITHMS))} "
                         "(or add one with metafunc.training.register_algorithm)")
    values = config.to_dict()
    for k, v in DATASET_DEFAULTS[config.dataset].items():
        if values.get(k) is None:
            values[k] = v
    if values["width"] is None:
        values["width"] = 64
    if values["ways"] is None:
        values["ways"] = 1  # regression: one output
    if values["queries"] is None:
        values["queries"] = values["shots"]
    if values["out"] is None:
        values["out"] = os.path.join("runs", f"{config.dataset}_{config.algorithm}")
    cfg = TrainConfig(**values)
    for name in ("ways", "shots", "queries", "meta_batch", "inner_steps", "iterations", "val_episodes", "width"):
        check_steps("train", name, getattr(cfg, name))
    check_steps("train", "eval_inner_steps", cfg.eval_inner_steps, minimum=0)
    for name in ("val_every", "checkpoint_every"):
        check_steps("train", name, getattr(cfg, name), minimum=0)
    for name in ("inner_lr", "outer_lr"):
        check_positive("train", name, getattr(cfg, name))
    check_choice("train", "mode", cfg.mode, ("auto", "vmap", "loop"))
    if cfg.chunk_size is not None:
        check_steps("train", "chunk_size", cfg.chunk_size)
    if cfg.threads is not None:
        check_steps("train", "threads", cfg.threads)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise TypeError(f"train: seed must be an int (got {cfg.seed!r})")
    if cfg.dataset != "sinusoid" and cfg.ways < 2:
        raise ValueError(f"train: ways must be >= 2 for classification (got {cfg.ways})")
    if cfg.dataset == "sinusoid" and not ALGORITHMS[cfg.algorithm].needs_head:
        raise ValueError(f"train: algorithm {cfg.algorithm!r} is a few-shot classifier; use it with --dataset "
                         "omniglot (or synthetic), not sinusoid regression")
    try:
        torch.device(cfg.device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"train: device must be a torch device such as 'cpu' or 'cuda' (got {cfg.device!r})") from e
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train: device {cfg.device!r} asked for but CUDA is not available; use --device cpu")
    return cfg


class SinusoidSource:
    """Sinusoid regression tasks (MAML paper) as a task source: ``sample(meta_batch, generator) -> Task``.

    Example:
        >>> SinusoidSource(shots=5, queries=20).sample(3, torch.Generator().manual_seed(0)).query_x.shape
        torch.Size([3, 20, 1])
    """

    def __init__(self, shots: int = 10, queries: int | None = None, dtype: torch.dtype = torch.float32):
        self.shots = check_steps("SinusoidSource", "shots", shots)
        self.queries = shots if queries is None else check_steps("SinusoidSource", "queries", queries)
        self.dtype = dtype

    def sample(self, meta_batch: int, generator: torch.Generator) -> Task:
        """``meta_batch`` tasks drawn with ``generator`` (on the generator's device)."""
        return sinusoid_tasks(meta_batch, shots=self.shots, queries=self.queries, generator=generator,
                              dtype=self.dtype)  # type: ignore[return-value]


class GaussianClassification:
    """Synthetic ``ways``-way tasks: each task draws class centres ``N(0, spread^2 I)`` in ``dim`` dimensions and
    examples ``centre + N(0, I)``; labels ``0..ways-1`` in a random order. A fast stand-in for image data.

    Example:
        >>> task = GaussianClassification(ways=3, shots=2, queries=4).sample(5, torch.Generator().manual_seed(0))
        >>> task.support_x.shape, task.query_y.shape
        (torch.Size([5, 6, 8]), torch.Size([5, 12]))
    """

    def __init__(self, ways: int, shots: int, queries: int, dim: int = 8, spread: float = 2.0,
                 dtype: torch.dtype = torch.float32):
        self.ways = check_steps("GaussianClassification", "ways", ways)
        self.shots = check_steps("GaussianClassification", "shots", shots)
        self.queries = check_steps("GaussianClassification", "queries", queries)
        self.dim = check_steps("GaussianClassification", "dim", dim)
        self.spread = check_positive("GaussianClassification", "spread", spread)
        self.dtype = dtype

    def sample(self, meta_batch: int, generator: torch.Generator) -> Task:
        """``meta_batch`` tasks drawn with ``generator``."""
        check_steps("GaussianClassification.sample", "meta_batch", meta_batch)
        dev = generator.device
        centres = self.spread * torch.randn(meta_batch, self.ways, 1, self.dim, generator=generator, device=dev,
                                            dtype=self.dtype)
        n = self.shots + self.queries
        x = centres + torch.randn(meta_batch, self.ways, n, self.dim, generator=generator, device=dev,
                                  dtype=self.dtype)
        y = torch.arange(self.ways, device=dev).view(1, self.ways, 1).expand(meta_batch, self.ways, n)

        def split(lo: int, hi: int) -> tuple[Tensor, Tensor]:
            xs = x[:, :, lo:hi].reshape(meta_batch, -1, self.dim)
            ys = y[:, :, lo:hi].reshape(meta_batch, -1)
            order = torch.argsort(torch.rand(ys.shape, generator=generator, device=dev), dim=1)
            return torch.gather(xs, 1, order.unsqueeze(-1).expand_as(xs)), torch.gather(ys, 1, order)

        sx, sy = split(0, self.shots)
        qx, qy = split(self.shots, n)
        return Task(sx, sy, qx, qy)


class Experiment(NamedTuple):
    """What a run needs: the pure model, the meta-parameters, the learner and the task sources by split.

    Example:
        >>> exp = build_experiment(resolve_config(TrainConfig(dataset="synthetic", ways=3, shots=2, width=8)))
        >>> exp.learner.name, exp.classification, sorted(exp.sources)
        ('maml', True, ['test', 'train', 'val'])
        >>> tasks = exp.sources["train"].sample(4, torch.Generator().manual_seed(0))
        >>> exp.model(exp.params, tasks.query_x[0]).shape  # 3 ways x 5 queries, 3 logits
        torch.Size([15, 3])
    """

    model: ModelFn
    params: Params
    learner: MetaLearner
    sources: dict[str, TaskSource]
    classification: bool


def _data_root(cfg: TrainConfig) -> Path:
    if cfg.data_root is not None:
        root = Path(cfg.data_root).expanduser()
    elif os.environ.get("METAFUNC_DATA"):
        root = Path(os.environ["METAFUNC_DATA"]) / "omniglot"
    else:
        raise ValueError("train: --dataset omniglot needs --data-root, the folder holding the Omniglot zips "
                         "(e.g. ../shared/data/omniglot), or the METAFUNC_DATA variable")
    if not root.is_dir():
        raise FileNotFoundError(f"train: data root {str(root)!r} does not exist or is not a folder; pass --data-root "
                                "pointing at the folder holding images_background_small1.zip / ..._small2.zip")
    return root


def _sources(cfg: TrainConfig, device: torch.device) -> dict[str, TaskSource]:
    if cfg.dataset == "sinusoid":
        return {"train": SinusoidSource(cfg.shots, cfg.queries), "val": SinusoidSource(cfg.shots, cfg.queries),
                "test": SinusoidSource(cfg.shots, 100)}
    if cfg.dataset == "synthetic":
        src = GaussianClassification(cfg.ways, cfg.shots, cfg.queries)
        return {"train": src, "val": src, "test": src}
    root = _data_root(cfg)
    try:
        from .data import omniglot_samplers
    except ImportError as e:  # pragma: no cover - only when the data package is broken
        raise RuntimeError(f"train: --dataset omniglot needs metafunc.data.omniglot_samplers ({e})") from e
    return dict(omniglot_samplers(root, ways=cfg.ways, shots=cfg.shots, queries=cfg.queries, device=device,
                                  seed=cfg.seed))


def _network(cfg: TrainConfig, with_head: bool) -> nn.Module:
    if cfg.dataset == "sinusoid":
        return models.mlp()
    if cfg.dataset == "synthetic":
        net = models.mlp(in_features=8, hidden=(cfg.width, cfg.width), out_features=cfg.ways, norm="layer")
        return net if with_head else net.body
    net = models.conv4(ways=cfg.ways, image_size=28, width=cfg.width)
    return net if with_head else nn.Sequential(net.features, nn.Flatten())


def build_experiment(config: TrainConfig) -> Experiment:
    """Model (seeded with ``config.seed``), meta-parameters, learner and task sources for a resolved config.

    Example:
        >>> exp = build_experiment(resolve_config(TrainConfig(dataset="sinusoid")))
        >>> exp.learner.name, sorted(exp.sources)
        ('maml', ['test', 'train', 'val'])
    """
    cfg = resolve_config(config)
    device = torch.device(cfg.device)
    spec = ALGORITHMS[cfg.algorithm]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = _network(cfg, spec.needs_head).to(device)
    model, params = functionalize(module)
    learner = spec.build(model, cfg)
    meta_params = {k: v.detach().requires_grad_(True) for k, v in learner.init(params).items()}
    return Experiment(model, meta_params, learner, _sources(cfg, device), cfg.dataset != "sinusoid")


def meta_gradient(batched_loss: Callable[[Params, Task], tuple[Tensor, Metrics]], params: Params,
                  tasks: Task) -> tuple[Tensor, Metrics]:
    """The per-step meta-gradient: ``loss, metrics = batched_loss(params, tasks); loss.backward()``.

    Leaves the meta-gradient of the meta-batch mean in each ``params[k].grad`` and returns the detached loss and
    metrics. A distributed run passes ``train(..., meta_gradient_fn=...)`` a version that all-reduces the grads.

    Example:
        >>> from metafunc import functionalize, maml, meta_batch, models, sinusoid_tasks
        >>> model, params = functionalize(models.mlp())
        >>> tasks = sinusoid_tasks(4, shots=5, generator=torch.Generator().manual_seed(0))
        >>> loss, metrics = meta_gradient(meta_batch(maml(model, inner_lr=0.01, loss="mse").meta_loss), params, tasks)
        >>> params["head.weight"].grad.shape
        torch.Size([1, 40])
    """
    loss, metrics = batched_loss(params, tasks)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}


def default_is_main() -> bool:
    """True unless torchrun's ``RANK`` says this is not rank 0 (only rank 0 writes logs, plots and checkpoints).

    Example:
        >>> isinstance(default_is_main(), bool)
        True
    """
    return int(os.environ.get("RANK", "0") or 0) == 0


class TrainResult(NamedTuple):
    """The trained meta-parameters, the records written to ``metrics.jsonl``, and where the files are.

    Example:
        >>> import tempfile
        >>> cfg = TrainConfig(dataset="synthetic", iterations=4, width=8, out=tempfile.mkdtemp())
        >>> result = train(cfg, progress=False, stop_after=2)  # interrupted after 2 of 4 iterations
        >>> [(r["iteration"], r["split"]) for r in result.records]
        [(1, 'train'), (2, 'train')]
        >>> sorted(p.name for p in result.out.iterdir())  # resume=True would continue from the checkpoint
        ['checkpoint.pt', 'config.json', 'metrics.jsonl']
        >>> result.config.meta_batch, sorted(result.params) == sorted(result.experiment.params)
        (8, True)
    """

    params: Params
    records: list[dict[str, Any]]
    out: Path
    config: TrainConfig
    experiment: Experiment
    seconds: float


def checkpoint_state(cfg: TrainConfig, iteration: int, params: Params, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Everything a run needs to continue exactly: parameters, optimizer, generator and torch RNG states.

    Example:
        >>> p = {"w": torch.zeros(2, requires_grad=True)}
        >>> state = checkpoint_state(TrainConfig(), 0, p, torch.optim.Adam(p.values()), torch.Generator(), [], 0.0)
        >>> sorted(state)[:3]
        ['config', 'iteration', 'optimizer']
    """
    return {
        "config": cfg.to_dict(),
        "iteration": int(iteration),
        "params": {k: v.detach().cpu().clone() for k, v in params.items()},
        "optimizer": optimizer.state_dict(),
        "rng": {"tasks": generator.get_state(), "torch": torch.get_rng_state()},
        "val": [r for r in records if r.get("split") == "val"],
        "seconds": float(seconds),
    }


def restore_checkpoint(checkpoint: dict[str, Any], cfg: TrainConfig, params: Params,
                       optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int:
    """Load a :func:`checkpoint_state` into live objects (checking it fits) and return its iteration.

    Example:
        >>> p = {"w": torch.zeros(2, requires_grad=True)}
        >>> opt, g = torch.optim.Adam(p.values()), torch.Generator()
        >>> restore_checkpoint(checkpoint_state(TrainConfig(), 7, p, opt, g, [], 0.0), TrainConfig(), p, opt, g)
        7
    """
    check_compatible(checkpoint, params, config=cfg.to_dict(), keys=RESUME_KEYS, caller="train --resume")
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(checkpoint["params"][k].to(v.device))
    optimizer.load_state_dict(checkpoint["optimizer"])
    rng = checkpoint.get("rng", {})
    generator.set_state(rng["tasks"])
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    return int(checkpoint["iteration"])


def _read_records(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    keep = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("iteration", 0) <= upto:
                keep.append(rec)
    return keep


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _validate(exp: Experiment, cfg: TrainConfig, params: Params, iteration: int) -> dict[str, Any]:
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1_000_003)
    res = evaluate_episodes(exp.learner, params, exp.sources["val"], episodes=cfg.val_episodes,
                            steps=cfg.eval_inner_steps, classification=exp.classification, generator=gen,
                            batch=min(cfg.meta_batch, cfg.val_episodes), mode=cfg.mode)
    return {"iteration": iteration, "split": "val", res.metric: res.mean, f"{res.metric}_ci95": res.ci95,
            "inner_steps": res.steps, "episodes": res.episodes}


def train(config: TrainConfig, *, resume: bool | str | os.PathLike = False,
          meta_gradient_fn: Callable[[Callable, Params, Task], tuple[Tensor, Metrics]] = meta_gradient,
          is_main: bool | None = None, progress: bool = True,
          stop_after: int | None = None,
          train_source: Callable[[TaskSource], TaskSource] | None = None) -> TrainResult:
    """Meta-train ``config.algorithm`` on ``config.dataset`` with Adam(``outer_lr``) for ``config.iterations``.

    Writes to ``config.out`` (main process only): ``config.json``, ``metrics.jsonl`` (one JSON record per
    iteration, ``"split": "train"``, and per validation, ``"split": "val"``), ``checkpoint.pt`` (atomically, every
    ``checkpoint_every`` iterations and at the end) and ``learning_curve.png``. ``resume=True`` continues from
    ``OUT/checkpoint.pt`` (or the path given): parameters, optimizer and generator states are restored, so the
    result equals an uninterrupted run bit for bit. ``stop_after`` ends the run early after that many iterations
    (as if interrupted; used to test resuming). ``train_source`` wraps the training task source: a distributed run
    passes ``lambda src: metafunc.distributed.ShardedSource(src, rank=r, world_size=n)`` so that each rank draws
    only its share of every meta-batch. ``config.threads`` is applied by the ``metafunc`` command, not here
    (a library call leaves torch's thread count alone).

    Example:
        >>> import tempfile
        >>> cfg = TrainConfig(dataset="synthetic", iterations=2, out=tempfile.mkdtemp())
        >>> result = train(cfg, progress=False)
        >>> result.records[-1]["iteration"]
        2
    """
    cfg = resolve_config(config)
    if is_main is None:
        is_main = default_is_main()
    out = Path(cfg.out)
    exp = build_experiment(cfg)
    if train_source is not None:
        exp = exp._replace(sources={**exp.sources, "train": train_source(exp.sources["train"])})
    params = exp.params
    optimizer = torch.optim.Adam(params.values(), lr=cfg.outer_lr)
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    start, seconds = 0, 0.0
    records: list[dict[str, Any]] = []
    if resume:
        path = out / "checkpoint.pt" if resume is True else Path(resume)
        ckpt = load_checkpoint(path)
        start = restore_checkpoint(ckpt, cfg, params, optimizer, generator)
        seconds = float(ckpt.get("seconds", 0.0))
        records = _read_records(out / "metrics.jsonl", start)
        if start >= cfg.iterations:
            raise ValueError(f"train: the checkpoint {str(path)!r} has already done {start} iterations; pass "
                             f"--iterations larger than {start} to continue")
    metrics_file = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        _atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        metrics_file = open(out / "metrics.jsonl", "a")
    batched = meta_batch_transform(exp.learner.meta_loss, mode=cfg.mode, chunk_size=cfg.chunk_size)
    end = cfg.iterations if stop_after is None else min(cfg.iterations, start + stop_after)
    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.iterations, initial=start, desc=f"{cfg.algorithm} {cfg.dataset}", dynamic_ncols=True)
    t0 = time.perf_counter()
    last_val: dict[str, Any] | None = next((r for r in reversed(records) if r.get("split") == "val"), None)
    try:
        for it in range(start, end):
            tasks = exp.sources["train"].sample(cfg.meta_batch, generator)
            optimizer.zero_grad(set_to_none=True)
            objective, metrics = meta_gradient_fn(batched, params, tasks)
            optimizer.step()
            rec: dict[str, Any] = {"iteration": it + 1, "split": "train", "objective": float(objective)}
            rec.update({k: float(v) for k, v in metrics.items()})
            records.append(rec)
            if metrics_file is not None:
                metrics_file.write(json.dumps(rec) + "\n")
            done = it + 1
            if is_main and ((cfg.val_every and done % cfg.val_every == 0) or done == cfg.iterations):
                last_val = _validate(exp, cfg, params, done)
                records.append(last_val)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(last_val) + "\n")
            if metrics_file is not None:
                metrics_file.flush()
            if bar is not None:
                post = {"loss": f"{rec.get('loss', rec['objective']):.3f}"}
                if "accuracy" in rec:
                    post["acc"] = f"{rec['accuracy']:.3f}"
                if last_val is not None:
                    key = "accuracy" if exp.classification else "mse"
                    post[f"val_{key}"] = f"{last_val[key]:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if is_main and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == end):
                save_checkpoint(out / "checkpoint.pt", checkpoint_state(
                    cfg, done, params, optimizer, generator, records, seconds + time.perf_counter() - t0))
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
    seconds += time.perf_counter() - t0
    if is_main and end == cfg.iterations:
        plot_learning_curve(records, out / "learning_curve.png", title=f"{cfg.algorithm} on {cfg.dataset}")
    return TrainResult(params, records, out, cfg, exp, seconds)


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_learning_curve(records: Iterable[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Save the training loss (and accuracy) per iteration, smoothed, with the validation points, to ``path``.

    Example:
        >>> import tempfile, os
        >>> recs = [{"iteration": i, "split": "train", "loss": 1.0 / i} for i in range(1, 50)]
        >>> plot_learning_curve(recs, os.path.join(tempfile.mkdtemp(), "curve.png")).suffix
        '.png'
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    train_recs = [r for r in records if r.get("split") == "train"]
    val_recs = [r for r in records if r.get("split") == "val"]
    has_acc = any("accuracy" in r for r in train_recs)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False)
    its = [r["iteration"] for r in train_recs]
    window = max(1, len(its) // 50)
    ax = axes[0][0]
    losses = [r.get("loss", r.get("objective", math.nan)) for r in train_recs]
    ax.plot(its, losses, color="C0", alpha=0.25, lw=0.8)
    ax.plot(its, _smooth(losses, window), color="C0", label="train query loss (after the inner steps)")
    if val_recs and "mse" in val_recs[0]:
        ax.plot([r["iteration"] for r in val_recs], [r["mse"] for r in val_recs], "o-", color="C3",
                label=f"validation MSE ({val_recs[0]['inner_steps']} steps)")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    if has_acc:
        ax = axes[0][1]
        accs = [r.get("accuracy", math.nan) for r in train_recs]
        ax.plot(its, _smooth(accs, window), color="C0", label="train query accuracy")
        if val_recs and "accuracy" in val_recs[0]:
            ax.errorbar([r["iteration"] for r in val_recs], [r["accuracy"] for r in val_recs],
                        yerr=[r["accuracy_ci95"] for r in val_recs], fmt="o-", color="C3", capsize=3,
                        label=f"validation accuracy ({val_recs[0]['inner_steps']} steps)")
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel("accuracy")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure atomically (temp file, then ``os.replace``) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The main job: MAML on sinusoids against a baseline pretrained on all tasks jointly (the MAML paper's comparison).

SINUSOID_EVAL_STEPS = (0, 1, 10)


class SinusoidComparison(NamedTuple):
    """Query MSE (600 held-out tasks, 100 query points each) after 0, 1 and 10 fine-tuning steps, per method.

    :func:`sinusoid_comparison` builds it; here it is filled by hand.

    Example:
        >>> def row(*means):
        ...     return {s: EvalResult("mse", m, 0.1, 1.0, 600, s) for s, m in zip((0, 1, 10), means)}
        >>> cmp = SinusoidComparison({"maml": row(3.2, 0.6, 0.4), "pretrained": row(3.0, 2.9, 2.5)}, {}, 10, 600)
        >>> print(cmp.table())
        Sinusoid regression, K=10: query MSE on 600 held-out tasks (mean +- 95% CI), after k fine-tuning steps ...
        method                   0 steps              1 step            10 steps
        ------------------------------------------------------------------------
        maml              3.200 +- 0.100      0.600 +- 0.100      0.400 +- 0.100
        pretrained        3.000 +- 0.100      2.900 +- 0.100      2.500 +- 0.100
        >>> cmp.as_dict()["results"]["maml"]["1"]["mean"]
        0.6
    """

    results: dict[str, dict[int, EvalResult]]
    baseline_params: Params
    shots: int
    episodes: int

    def table(self) -> str:
        """The comparison as a text table (mean +- 95% CI)."""
        steps = sorted(next(iter(self.results.values())))
        head = f"{'method':<12}" + "".join(f"{f'{s} step' + ('s' if s != 1 else ''):>20}" for s in steps)
        lines = [f"Sinusoid regression, K={self.shots}: query MSE on {self.episodes} held-out tasks "
                 "(mean +- 95% CI), after k fine-tuning steps on the K support points", head, "-" * len(head)]
        for name, row in self.results.items():
            lines.append(f"{name:<12}" + "".join(f"{f'{row[s].mean:.3f} +- {row[s].ci95:.3f}':>20}" for s in steps))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able results."""
        return {"shots": self.shots, "episodes": self.episodes,
                "results": {m: {str(s): r.as_dict() for s, r in row.items()} for m, row in self.results.items()}}


def pretrain_baseline(config: TrainConfig, *, progress: bool = True) -> Params:
    """The MAML paper's baseline: the same network (same initial weights) trained to regress sampled sinusoids
    jointly, without adaptation: MSE on all points of ``meta_batch`` tasks per step, Adam(``outer_lr``), for
    ``iterations`` steps (as many gradient steps as meta-training).

    Example:
        >>> params = pretrain_baseline(TrainConfig(iterations=3), progress=False)
        >>> sorted(params)[0]
        'body.0.bias'
    """
    cfg = resolve_config(config)
    if cfg.dataset != "sinusoid":
        raise ValueError(f"pretrain_baseline: the joint-training baseline is for --dataset sinusoid (got {cfg.dataset!r})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = models.mlp().to(cfg.device)
    model, params = functionalize(module)
    optimizer = torch.optim.Adam(params.values(), lr=cfg.outer_lr)
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 7)
    source = SinusoidSource(cfg.shots, cfg.queries)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.iterations, desc="pretrained baseline", dynamic_ncols=True)
    for it in range(cfg.iterations):
        t = source.sample(cfg.meta_batch, generator)
        x = torch.cat([t.support_x, t.query_x], 1).reshape(-1, 1)
        y = torch.cat([t.support_y, t.query_y], 1).reshape(-1, 1)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(params, x), y)
        loss.backward()
        optimizer.step()
        if bar is not None:
            if it % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    return {k: v.detach() for k, v in params.items()}


def sinusoid_comparison(result: TrainResult, baseline_params: Params, *, episodes: int = 600,
                        steps: tuple[int, ...] = SINUSOID_EVAL_STEPS) -> SinusoidComparison:
    """Evaluate the meta-learned initialisation and the pretrained baseline on the same held-out tasks (K support
    points, 100 query points) after each number of fine-tuning ``steps`` (SGD at ``inner_lr`` for the baseline; the
    learner's own inner loop for the meta-learner).

    Example:
        >>> import tempfile
        >>> res = train(TrainConfig(iterations=2, val_every=0, out=tempfile.mkdtemp()), progress=False)
        >>> cmp = sinusoid_comparison(res, pretrain_baseline(res.config, progress=False), episodes=4, steps=(0, 1))
        >>> sorted(cmp.results)
        ['maml', 'pretrained']
    """
    cfg, exp = result.config, result.experiment
    finetune = maml(exp.model, inner_lr=cfg.inner_lr, steps=1, loss="mse")
    source = SinusoidSource(cfg.shots, 100)
    results: dict[str, dict[int, EvalResult]] = {}
    for name, learner, params in ((cfg.algorithm, exp.learner, result.params),
                                  ("pretrained", finetune, baseline_params)):
        row = {}
        for s in steps:
            gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 2_000_003)  # same tasks for all rows
            row[s] = evaluate_episodes(learner, params, source, episodes=episodes, steps=s, classification=False,
                                       generator=gen, batch=100, mode=cfg.mode)
        results[name] = row
    return SinusoidComparison(results, baseline_params, cfg.shots, episodes)


def plot_sinusoid_adaptation(result: TrainResult, baseline_params: Params, path: str | os.PathLike, *,
                             tasks: int = 3, steps: tuple[int, ...] = (0, 1, 10)) -> Path:
    """The MAML paper's figure: for a few held-out tasks, the prediction before adaptation and after 1 and 10
    steps, the ground truth and the K support points; top row the meta-learner, bottom row the pretrained baseline.

    Example:
        >>> import tempfile, os
        >>> res = train(TrainConfig(iterations=2, val_every=0, out=tempfile.mkdtemp()), progress=False)
        >>> plot_sinusoid_adaptation(res, res.params, os.path.join(res.out, "fig.png"), tasks=1).name
        'fig.png'
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, exp = result.config, result.experiment
    finetune = maml(exp.model, inner_lr=cfg.inner_lr, steps=1, loss="mse")
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 3_000_017)
    drawn = sinusoid_tasks(tasks, shots=cfg.shots, generator=gen, return_parameters=True)
    grid = torch.linspace(-5, 5, 200, device=cfg.device).unsqueeze(-1)
    fig, axes = plt.subplots(2, tasks, figsize=(4.2 * tasks, 6.5), squeeze=False)
    rows = ((cfg.algorithm.upper(), exp.learner, result.params), ("pretrained", finetune, baseline_params))
    for r, (name, learner, params) in enumerate(rows):
        params = {k: v.detach() for k, v in params.items()}
        for c in range(tasks):
            ax = axes[r][c]
            t = drawn.task.task_at(c)
            truth = drawn.amplitude[c] * torch.sin(grid - drawn.phase[c])
            ax.plot(grid.cpu(), truth.cpu(), color="C3", lw=2, label="ground truth")
            for s, style in zip(steps, (":", "--", "-", "-.")):
                adapted = params if s == 0 else learner.adapt(params, t.support_x, t.support_y, steps=s)[0]
                with torch.no_grad():
                    pred = learner.predict(adapted, grid)
                label = "pre-update" if s == 0 else f"{s} grad step{'s' if s != 1 else ''}"
                ax.plot(grid.cpu(), pred.cpu(), style, color="C0" if s else "C2", alpha=0.55 + 0.045 * s, label=label)
            ax.plot(t.support_x.cpu(), t.support_y.cpu(), "^", color="purple", ms=7, label=f"{cfg.shots} support points")
            ax.set_title(f"{name}, task {c + 1}")
            ax.set_ylim(-6, 6)
            if c == 0:
                ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _save_figure(fig, path)
