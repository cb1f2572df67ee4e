"""A run's settings: :class:`TrainConfig`, the dataset defaults and their validation."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from metafunc._shared import check_choice, check_positive, check_steps
from metafunc.core.batching import Mode
from metafunc.registry import LEARNERS
from metafunc.train.datasets import IMAGE_BENCHMARKS, dataset_spec

__all__ = ["TrainConfig", "ResolvedConfig", "UNLIMITED_ITERATIONS", "OUTER_OPTIMIZERS", "OUTER_LR_SCHEDULES",
           "BACKBONES", "RESUME_KEYS", "resolve_config"]

BACKBONES = ("conv4", "resnet12")
"""``--backbone`` of the image data sets: Conv-4 (the MAML/ProtoNet network) or ResNet-12 (MetaOptNet's)."""

UNLIMITED_ITERATIONS = 10**9
"""``iterations`` of a run with a ``time_budget`` and no iteration count of its own."""

OUTER_OPTIMIZERS = ("adam", "sgd")
"""``--outer-optimizer``: Adam (the MAML paper's) or plain SGD (Reptile's interpolation step: with
:func:`metafunc.reptile`, SGD at ``outer_lr`` epsilon moves the initialisation ``epsilon`` of the way to the mean of
the adapted weights)."""

OUTER_LR_SCHEDULES = ("constant", "linear", "cosine")
"""``--outer-lr-schedule``: a constant ``outer_lr``, one annealed linearly to 0 over the run (Reptile's schedule), or
along half a cosine to 1% of it (MAML++'s): over ``iterations``, or over ``time_budget`` (by the meta-step seconds
spent) when a budget is given."""

RESUME_KEYS = ("algorithm", "dataset", "ways", "shots", "queries", "meta_batch", "inner_steps", "inner_lr",
               "outer_lr", "seed", "width", "mode", "options", "backbone", "outer_optimizer", "outer_lr_schedule",
               "model")
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
    """A name of :data:`metafunc.train.DATASETS`, or ``module:factory`` for your own episodes."""
    data_root: str | None = None
    model: str | None = None
    """``module:factory`` of your own ``nn.Module`` (default: the dataset's network, see ``backbone``)."""
    ways: int | None = None
    val_ways: int | None = None
    """Classes per validation task (default: ``ways``, or all the validation split's classes if it has fewer)."""
    val_shots: int | None = None
    """Support examples per class of the validation tasks (default: ``shots``; Reptile trains at more shots than it
    is tested at)."""
    val_queries: int | None = None
    """Query examples per class of the validation tasks (default: ``queries``)."""
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
    workers: int | None = None
    """Tasks at once in the CPU loop, each on its own thread (``meta_value_and_grad(workers=)``; ``None``: measured
    under ``mode="auto"``, else 2 for metafunc's learners)."""
    channels_last: bool | None = None
    """Each task's images and convolution weights in channels-last format in the loop (``None``: measured under
    ``mode="auto"`` for images on a CPU, else off)."""
    threads: int | None = None
    device: str = "cpu"
    seed: int = 0
    out: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The learner's own options (``metafunc.LEARNERS[algorithm].options``: ``lam``, ``checkpoints``, ...)."""
    backbone: str = "conv4"
    """The image data sets' network: ``"conv4"`` or ``"resnet12"`` (Omniglot uses Conv-4)."""
    augment: bool | None = None
    """Random crop and horizontal flip of the training episodes, on the device (image benchmarks; on by default for
    metric learners, off for the MAML family)."""
    time_budget: float | None = None
    """Train for this many seconds of meta-steps (data loading, validation and checkpoints excluded), then stop;
    ``iterations`` is then an upper bound (unlimited unless given). Resuming honours what is left."""
    on_nonfinite: str = "stop"
    """A non-finite meta-loss or meta-gradient: ``"stop"`` the run (exit status 3), or ``"skip"`` the step."""
    max_nonfinite: int = 10
    """With ``on_nonfinite="skip"``: the run stops once this many steps have been skipped."""
    outer_optimizer: str = "adam"
    """The meta-update: ``"adam"`` or ``"sgd"`` (:data:`OUTER_OPTIMIZERS`)."""
    outer_lr_schedule: str = "constant"
    """``"constant"`` or ``"linear"`` (annealed to 0 over the run; :data:`OUTER_LR_SCHEDULES`)."""
    epoch_length: int = 500
    """Meta-iterations per epoch, for learners annealed by epoch (MAML++: 500, as the authors' configs)."""
    download: bool = False
    """Fetch the dataset's files into ``data_root`` first when missing (datasets whose factory takes ``download``)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the settings."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ResolvedConfig(TrainConfig):
    """A :class:`TrainConfig` with every setting filled in and checked: what :func:`resolve_config` returns and what
    the trainer's functions take.

    Example:
        >>> cfg = resolve_config(TrainConfig(dataset="synthetic"))
        >>> isinstance(cfg, ResolvedConfig), isinstance(cfg, TrainConfig), cfg.ways
        (True, True, 5)
    """

    ways: int = 0
    shots: int = 0
    queries: int = 0
    meta_batch: int = 0
    inner_steps: int = 0
    eval_inner_steps: int = 0
    inner_lr: float = 0.0
    outer_lr: float = 0.0
    iterations: int = 0
    val_every: int = 0
    val_episodes: int = 0
    checkpoint_every: int = 0
    width: int = 0
    mode: Mode = "auto"
    out: str = ""
    augment: bool = False


_DEVICE_TYPES = ("cpu", "cuda")


def _check_device(device: Any) -> None:
    """A device this build of torch can train on, else a ValueError naming ``--device`` and the fix."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"train: device must be a torch device such as 'cpu' or 'cuda' (got {device!r}); pass --device cpu or --device cuda") from e
    if kind not in _DEVICE_TYPES:
        raise ValueError(f"train: device {device!r} is not supported for training (metafunc trains on "
                         f"{' or '.join(_DEVICE_TYPES)}); pass --device cpu or --device cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train: device {device!r} asked for but CUDA is not available; use --device cpu")


def _fill_defaults(config: TrainConfig) -> dict[str, Any]:
    values = config.to_dict()
    if config.time_budget is not None and config.iterations is None:
        values["iterations"] = UNLIMITED_ITERATIONS   # the budget decides when to stop
    for k, v in dataset_spec(config.dataset).defaults.items():
        if values.get(k) is None:
            values[k] = v
    values["width"] = 64 if values["width"] is None else values["width"]
    values["queries"] = values["shots"] if values["queries"] is None else values["queries"]
    if values["out"] is None:
        name = str(config.dataset).replace(":", "_").replace(".", "_")
        values["out"] = os.path.join("runs", f"{name}_{config.algorithm}")
    if values.get("augment") is None:
        values["augment"] = config.dataset in IMAGE_BENCHMARKS and not LEARNERS[config.algorithm].needs_head
    return values


def resolve_config(config: TrainConfig) -> ResolvedConfig:
    """Fill ``None`` fields with the dataset's defaults and validate every setting (errors name the flag); a
    :class:`ResolvedConfig` is returned as it is (a setting is resolved once).

    Example:
        >>> resolve_config(TrainConfig()).iterations
        70000
    """
    if isinstance(config, ResolvedConfig):
        return config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train: config must be a TrainConfig (got {type(config).__name__})")
    if config.algorithm not in LEARNERS:
        raise ValueError(f"train: unknown algorithm {config.algorithm!r}; choose one of {', '.join(LEARNERS)} "
                         "(or add one with metafunc.register_learner)")
    cfg = ResolvedConfig(**_fill_defaults(config))
    _check_numbers(cfg)
    _check_choices(cfg)
    _check_device(cfg.device)
    return cfg


def _check_numbers(cfg: ResolvedConfig) -> None:
    for name in ("ways", "shots", "queries", "meta_batch", "inner_steps", "iterations", "val_episodes", "width"):
        check_steps("train", name, getattr(cfg, name))
    check_steps("train", "eval_inner_steps", cfg.eval_inner_steps, minimum=0)
    for name in ("val_every", "checkpoint_every"):
        check_steps("train", name, getattr(cfg, name), minimum=0)
    for name in ("inner_lr", "outer_lr"):
        check_positive("train", name, getattr(cfg, name))
    for name in ("chunk_size", "workers", "threads", "val_ways", "val_shots", "val_queries"):
        if getattr(cfg, name) is not None:
            check_steps("train", name, getattr(cfg, name), minimum=2 if name == "val_ways" else 1)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise TypeError(f"train: seed must be an int (got {cfg.seed!r})")
    if cfg.time_budget is not None:
        check_positive("train", "time_budget", cfg.time_budget)
    check_steps("train", "max_nonfinite", cfg.max_nonfinite)
    check_steps("train", "epoch_length", cfg.epoch_length)


def _check_loop_settings(cfg: ResolvedConfig) -> None:
    """``--workers`` and ``--channels-last`` shape the loop, so ``--mode vmap`` cannot take them."""
    if cfg.channels_last is not None and not isinstance(cfg.channels_last, bool):
        raise TypeError(f"train: channels_last must be true, false or unset (got {cfg.channels_last!r})")
    if cfg.mode == "vmap" and ((cfg.workers or 1) > 1 or cfg.channels_last):
        flag = f"--workers {cfg.workers}" if (cfg.workers or 1) > 1 else "--channels-last"
        raise ValueError(f"train: {flag} sets how the loop runs its tasks, but --mode vmap runs them under vmap; "
                         "use --mode loop or auto, or drop the flag")


def _check_choices(cfg: ResolvedConfig) -> None:
    check_choice("train", "mode", cfg.mode, ("auto", "vmap", "loop"))
    _check_loop_settings(cfg)
    if cfg.dataset != "sinusoid" and cfg.ways < 2:
        raise ValueError(f"train: ways must be >= 2 for classification (got {cfg.ways})")
    if cfg.dataset == "sinusoid" and not LEARNERS[cfg.algorithm].needs_head:
        raise ValueError(f"train: algorithm {cfg.algorithm!r} is a few-shot classifier; use it with --dataset "
                         "omniglot (or synthetic), not sinusoid regression")
    check_choice("train", "on_nonfinite", cfg.on_nonfinite, ("stop", "skip"))
    check_choice("train", "outer_optimizer", cfg.outer_optimizer, OUTER_OPTIMIZERS)
    check_choice("train", "outer_lr_schedule", cfg.outer_lr_schedule, OUTER_LR_SCHEDULES)
    check_choice("train", "backbone", cfg.backbone, BACKBONES)
    if cfg.backbone != "conv4" and cfg.dataset not in IMAGE_BENCHMARKS:
        raise ValueError(f"train: --backbone {cfg.backbone} is for the image benchmarks ({', '.join(IMAGE_BENCHMARKS)}); "
                         f"{cfg.dataset} uses its own network (or pass --model module:factory)")
    if cfg.model is not None and cfg.backbone != "conv4":
        raise ValueError(f"train: pass --model or --backbone, not both (got --model {cfg.model} --backbone "
                         f"{cfg.backbone})")
    if not isinstance(cfg.options, dict):
        raise TypeError(f"train: options must be a dict of the learner's options (got {type(cfg.options).__name__})")
    own = {o.name for o in LEARNERS[cfg.algorithm].options}
    unknown = sorted(set(cfg.options) - own)
    if unknown:
        raise ValueError(f"train: {cfg.algorithm} takes no option(s) {unknown}; its options are: "
                         f"{', '.join(sorted(own)) or 'none'}")
