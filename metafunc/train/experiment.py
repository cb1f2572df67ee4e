"""What a run is made of: the model, the meta-parameters, the learner (from the registry) and the task sources."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, cast

import torch
from torch import nn

from metafunc.algorithms import MetaLearner
from metafunc.core.functional import functionalize
from metafunc.core.types import ModelFn, Params
from metafunc.data.sinusoid import SinusoidSource
from metafunc.data.synthetic import GaussianClassification
from metafunc.nn import models
from metafunc.nn.resnet12 import resnet12
from metafunc.registry import LEARNERS
from metafunc.train.config import DATA_FOLDERS, IMAGE_SIZES, ResolvedConfig, TrainConfig, resolve_config
from metafunc.train.evaluation import TaskSource

__all__ = ["Experiment", "build_experiment", "build_learner", "learner_options"]


def learner_options(cfg: ResolvedConfig) -> dict[str, Any]:
    """The keyword options the run gives its learner's factory: the common ones from the run's settings
    (``inner_lr``, ``steps``, ``loss``, ``ways``) and the learner's own from ``cfg.options``.

    Example:
        >>> learner_options(resolve_config(TrainConfig(algorithm="imaml", dataset="synthetic", options={"lam": 2.0})))
        {'inner_lr': 0.4, 'steps': 1, 'loss': 'cross_entropy', 'ways': 5, 'lam': 2.0}
    """
    loss = "mse" if cfg.dataset == "sinusoid" else "cross_entropy"
    return {"inner_lr": cfg.inner_lr, "steps": cfg.inner_steps, "loss": loss, "ways": cfg.ways, **(cfg.options or {})}


def build_learner(cfg: ResolvedConfig, model: ModelFn) -> MetaLearner:
    """The registered learner ``cfg.algorithm`` over ``model`` with :func:`learner_options`.

    Example:
        >>> from metafunc import functionalize, models
        >>> model, _ = functionalize(models.mlp())
        >>> build_learner(resolve_config(TrainConfig(algorithm="checkpointed_maml")), model).name
        'checkpointed_maml'
    """
    try:
        return LEARNERS[cfg.algorithm].build(model, **learner_options(cfg))
    except TypeError as e:
        raise ValueError(f"train: {e}") from None


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


def _data_root(cfg: ResolvedConfig) -> Path:
    folder = DATA_FOLDERS[cfg.dataset]
    if cfg.data_root is not None:
        root = Path(cfg.data_root).expanduser()
    elif os.environ.get("METAFUNC_DATA"):
        root = Path(os.environ["METAFUNC_DATA"]) / folder
    else:
        raise ValueError(f"train: --dataset {cfg.dataset} needs --data-root, the folder holding its files "
                         f"(e.g. ../shared/data/{folder}), or the METAFUNC_DATA variable")
    if not root.is_dir():
        holds = ("images_background_small1.zip / ..._small2.zip" if cfg.dataset == "omniglot" else
                 {"cifar100": "cifar-100-python.tar.gz", "mini_imagenet": "images/ + train.csv, val.csv, test.csv "
                  "(or the mini-imagenet-cache-*.pkl files)", "tiered_imagenet": "{train,val,test}_images_png.pkl "
                  "and {split}_labels.pkl"}[folder])
        raise FileNotFoundError(f"train: data root {str(root)!r} does not exist or is not a folder; pass --data-root "
                                f"pointing at the folder holding {holds}")
    return root


def _sources(cfg: ResolvedConfig, device: torch.device) -> dict[str, TaskSource]:
    if cfg.dataset == "sinusoid":
        return {"train": SinusoidSource(cfg.shots, cfg.queries), "val": SinusoidSource(cfg.shots, cfg.queries),
                "test": SinusoidSource(cfg.shots, 100)}
    if cfg.dataset == "synthetic":
        src = GaussianClassification(cfg.ways, cfg.shots, cfg.queries)
        return {"train": src, "val": src, "test": src}
    from metafunc import data

    root = _data_root(cfg)
    make: dict[str, Callable[..., dict[str, Any]]] = {"omniglot": data.omniglot_samplers, "cifar_fs": data.cifar_fs_samplers, "fc100": data.fc100_samplers,
            "mini_imagenet": data.mini_imagenet_samplers, "tiered_imagenet": data.tiered_imagenet_samplers}
    sources: dict[str, TaskSource] = dict(make[cfg.dataset](root, ways=cfg.ways, shots=cfg.shots, queries=cfg.queries,
                                                             device=device, seed=cfg.seed))
    if cfg.augment:
        padding = 4 if IMAGE_SIZES.get(cfg.dataset, 28) <= 32 else 8
        sources["train"] = data.AugmentedSource(sources["train"], padding=padding)
    return sources


def _network(cfg: ResolvedConfig, with_head: bool) -> nn.Module:
    if cfg.dataset == "sinusoid":
        return models.mlp()
    if cfg.dataset == "synthetic":
        mlp = models.mlp(in_features=8, hidden=(cfg.width, cfg.width), out_features=cfg.ways, norm="layer")
        return mlp if with_head else cast(nn.Module, mlp.body)
    if cfg.backbone == "resnet12":
        return resnet12(cfg.ways if with_head else None)
    size, channels = (IMAGE_SIZES[cfg.dataset], 3) if cfg.dataset in IMAGE_SIZES else (28, 1)
    conv = models.conv4(ways=cfg.ways, in_channels=channels, image_size=size, width=cfg.width)
    return conv if with_head else nn.Sequential(cast(nn.Module, conv.features), nn.Flatten())


def build_experiment(config: TrainConfig) -> Experiment:
    """Model (seeded with ``config.seed``), meta-parameters, learner and task sources for a resolved config.

    Example:
        >>> exp = build_experiment(resolve_config(TrainConfig(dataset="sinusoid")))
        >>> exp.learner.name, sorted(exp.sources)
        ('maml', ['test', 'train', 'val'])
    """
    cfg = resolve_config(config)
    device = torch.device(cfg.device)
    spec = LEARNERS[cfg.algorithm]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = _network(cfg, spec.needs_head).to(device)
    model, params = functionalize(module)
    learner = build_learner(cfg, model)
    meta_params = {k: v.detach().requires_grad_(True) for k, v in learner.init(params).items()}
    return Experiment(model, meta_params, learner, _sources(cfg, device), cfg.dataset != "sinusoid")
