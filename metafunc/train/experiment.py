"""What a run is made of: the model, the meta-parameters, the learner (from the registry) and the task sources."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from typing import Any, Callable, NamedTuple, cast

import torch
from torch import nn

from metafunc._shared import load_attr
from metafunc.algorithms import MetaLearner
from metafunc.core.functional import functionalize
from metafunc.core.types import ModelFn, Params, Task
from metafunc.nn import BatchNorm, convert_norm_layers, models
from metafunc.nn.resnet12 import resnet12
from metafunc.registry import LEARNERS
from metafunc.train.config import ResolvedConfig, TrainConfig, resolve_config
from metafunc.train.datasets import data_root, dataset_spec
from metafunc.train.evaluation import TaskSource

__all__ = ["Experiment", "build_experiment", "learner_options", "build_sources", "build_network"]


def learner_options(cfg: ResolvedConfig) -> dict[str, Any]:
    """The keyword options the run gives its learner's factory: the common ones from the run's settings
    (``inner_lr``, ``steps``, ``loss``, ``ways``) and the learner's own from ``cfg.options``.

    Example:
        >>> learner_options(resolve_config(TrainConfig(algorithm="imaml", dataset="synthetic", options={"lam": 2.0})))
        {'inner_lr': 0.4, 'steps': 1, 'loss': 'cross_entropy', 'ways': 5, 'lam': 2.0}
    """
    loss = "mse" if cfg.dataset == "sinusoid" else "cross_entropy"
    return {"inner_lr": cfg.inner_lr, "steps": cfg.inner_steps, "loss": loss, "ways": cfg.ways, **(cfg.options or {})}


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
    sources: Mapping[str, TaskSource]
    classification: bool
    batch_norm: bool = False
    """Whether the network has BatchNorm layers (evaluation then states its BatchNorm protocol)."""


def build_sources(cfg: ResolvedConfig) -> Mapping[str, TaskSource]:
    """The run's task sources by split, from the dataset registry (or the user's ``module:factory``), with the
    training split augmented when ``cfg.augment``.

    Example:
        >>> sorted(build_sources(resolve_config(TrainConfig(dataset="synthetic"))))
        ['test', 'train', 'val']
    """
    spec = dataset_spec(cfg.dataset)
    root = data_root(spec, cfg.data_root, download=cfg.download)
    settings = dict(ways=cfg.ways, shots=cfg.shots, queries=cfg.queries, device=torch.device(cfg.device),
                    seed=cfg.seed, val_ways=cfg.val_ways, download=cfg.download, root=root)
    if cfg.val_ways is not None and not spec.accepts("val_ways"):
        raise ValueError(f"train: --val-ways is not taken by dataset {cfg.dataset} (its factory has no val_ways "
                         "option); leave it out")
    settings = {k: v for k, v in settings.items() if k != "root" or root is not None}
    sources = spec.build(**settings)
    wraps: dict[str, Callable[[], TaskSource]] = {}
    val = {k: v for k, v in (("shots", cfg.val_shots), ("queries", cfg.val_queries)) if v is not None}
    if val and any(val[k] != settings[k] for k in val):   # e.g. Reptile: trains at more shots than it tests
        wraps["val"] = lambda: spec.build(**{**settings, **val})["val"]
    if cfg.augment:
        from metafunc.data import AugmentedSource
        padding = 4 if (spec.image_size or 28) <= 32 else 8
        wraps["train"] = lambda: AugmentedSource(sources["train"], padding=padding)
    return _SplitsWith(sources, wraps) if wraps else sources


class _SplitsWith(Mapping[str, TaskSource]):
    """``sources`` with some splits made otherwise (``wraps[split]()``), every split built only when first read."""

    def __init__(self, sources: Mapping[str, TaskSource], wraps: dict[str, Callable[[], TaskSource]]) -> None:
        self._sources, self._wraps = sources, wraps
        self._built: dict[str, TaskSource] = {}

    def __getitem__(self, split: str) -> TaskSource:
        if split not in self._wraps:
            return self._sources[split]
        if split not in self._built:
            self._built[split] = self._wraps[split]()
        return self._built[split]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def _probe(source: TaskSource) -> Task:
    """One task of ``source``, drawn with a throwaway generator (the run's generator is not touched)."""
    return source.sample(1, torch.Generator().manual_seed(0))


def build_network(cfg: ResolvedConfig, probe: Task, *, with_head: bool) -> nn.Module:
    """The run's network: ``cfg.model`` (``module:factory``, norm layers made exact), else the dataset's: the
    sinusoid MLP, ResNet-12 (``backbone``), a Conv-4 for images ``(C, H, W)`` or a LayerNorm MLP for feature vectors.
    ``with_head=False`` (metric learners) drops the output layer; ``probe`` is one task of the data (its example
    shape picks the built-in network).

    Example:
        >>> cfg = resolve_config(TrainConfig(dataset="synthetic", width=8))
        >>> probe = build_sources(cfg)["train"].sample(1, torch.Generator())
        >>> type(build_network(cfg, probe, with_head=True)).__name__
        'MLP'
    """
    if cfg.model is not None:
        factory = load_attr(cfg.model, caller="train", flag="--model", what="a factory returning an nn.Module")
        takes_ways = "ways" in inspect.signature(factory).parameters
        module = factory(ways=cfg.ways) if takes_ways and with_head else factory()
        if not isinstance(module, nn.Module):
            raise TypeError(f"train: --model {cfg.model} must return an nn.Module (got {type(module).__name__})")
        return convert_norm_layers(module)
    if cfg.dataset == "sinusoid":
        return models.mlp()
    if cfg.backbone == "resnet12":
        return resnet12(cfg.ways if with_head else None)
    shape = tuple(probe.support_x.shape[2:])
    if len(shape) == 1:
        mlp = models.mlp(in_features=shape[0], hidden=(cfg.width, cfg.width), out_features=cfg.ways, norm="layer")
        return mlp if with_head else cast(nn.Module, mlp.body)
    if len(shape) != 3:
        raise ValueError(f"train: dataset {cfg.dataset} gives examples of shape {shape}; the built-in networks take "
                         "feature vectors (D,) or images (C, H, W): pass --model module:factory for your own network")
    conv = models.conv4(ways=cfg.ways, in_channels=shape[0], image_size=shape[1], width=cfg.width)
    return conv if with_head else nn.Sequential(cast(nn.Module, conv.features), nn.Flatten())


def build_experiment(config: TrainConfig) -> Experiment:
    """Model (seeded with ``config.seed``), meta-parameters, learner and task sources for a resolved config.

    Example:
        >>> exp = build_experiment(resolve_config(TrainConfig(dataset="sinusoid")))
        >>> exp.learner.name, sorted(exp.sources)
        ('maml', ['test', 'train', 'val'])
    """
    cfg = resolve_config(config)
    spec = LEARNERS[cfg.algorithm]
    sources = build_sources(cfg)
    probe = _probe(sources["train"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = build_network(cfg, probe, with_head=spec.needs_head).to(torch.device(cfg.device))
    model, params = functionalize(module)
    try:
        learner = spec.build(model, **learner_options(cfg))
    except TypeError as e:
        raise ValueError(f"train: {e}") from None
    meta_params = {k: v.detach().requires_grad_(True) for k, v in learner.init(params).items()}
    classification = not probe.support_y.is_floating_point()
    batch_norm = any(isinstance(m, (BatchNorm, nn.modules.batchnorm._BatchNorm)) for m in module.modules())
    return Experiment(model, meta_params, learner, sources, classification, batch_norm)
