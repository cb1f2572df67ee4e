"""One registry of datasets, as :data:`metafunc.LEARNERS` is of learners: name -> a factory of task sources by split,
its options read from its signature, with the training defaults of the paper that set the benchmark.

A factory returns ``{"train": source, "val": source, "test": source}`` (a mapping, built lazily or not) or one source
used for every split; a source is anything with ``sample(meta_batch, generator) -> Task``. It takes, of the settings
a run resolves (:data:`SOURCE_OPTIONS`: ``root``, ``ways``, ``shots``, ``queries``, ``val_ways``, ``device``,
``seed``, ``download``), those it declares. ``metafunc train --dataset NAME`` takes a registered name, or
``module:factory`` for a user's own episodes (no registration needed)::

    def my_episodes(*, ways, shots, queries, seed):       # in my_data.py
        return {"train": EpisodeSampler(x_train, y_train, ways=ways, shots=shots, queries=queries), ...}

    metafunc train --dataset my_data:my_episodes --model my_models:my_cnn --algorithm protonet
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from metafunc._shared import load_attr
from metafunc.data import (
    cifar_fs_samplers,
    fc100_samplers,
    mini_imagenet_samplers,
    omniglot_samplers,
    tiered_imagenet_samplers,
)
from metafunc.data.sinusoid import SinusoidSource
from metafunc.data.synthetic import GaussianClassification

__all__ = ["DatasetSpec", "DATASETS", "register_dataset", "dataset_spec", "data_root", "SOURCE_OPTIONS", "GENERIC_DEFAULTS",
           "IMAGE_BENCHMARKS", "SPLITS"]

SOURCE_OPTIONS = ("root", "ways", "shots", "queries", "val_ways", "device", "seed", "download")
"""Settings a run passes to a dataset factory, each only if the factory declares it."""
SPLITS = ("train", "val", "test")

GENERIC_DEFAULTS: dict[str, Any] = dict(
    ways=5, shots=1, queries=15, meta_batch=16, inner_steps=1, eval_inner_steps=3, inner_lr=0.4, outer_lr=1e-3,
    iterations=1000, val_every=100, val_episodes=100, checkpoint_every=100, mode="auto")
"""The training defaults of a ``module:factory`` dataset (the MAML paper's Omniglot setting, meta-batch 16)."""

_MAML_IMAGENET = dict(ways=5, shots=1, queries=15, meta_batch=4, inner_steps=5, eval_inner_steps=10, inner_lr=0.01,
                      outer_lr=1e-3, iterations=60000, val_every=500, val_episodes=100, checkpoint_every=500,
                      width=32, mode="auto")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its ``factory``, its training ``defaults``, the ``folder`` under ``$METAFUNC_DATA``
    holding its files (``None``: generated, no files), the side of its images (``image_size``, for augmentation and
    the Conv-4), and what ``files`` its folder must hold (for the error when it is missing).

    Example:
        >>> spec = DATASETS["omniglot"]
        >>> spec.folder, spec.defaults["meta_batch"], spec.accepts("val_ways")
        ('omniglot', 32, True)
    """

    name: str
    factory: Callable[..., Any]
    defaults: dict[str, Any]
    folder: str | None = None
    image_size: int | None = None
    files: str = ""
    description: str = ""

    def accepts(self, option: str) -> bool:
        """Whether the factory takes the keyword ``option`` (or any keyword: ``**kwargs``)."""
        params = inspect.signature(self.factory).parameters
        return option in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def build(self, **settings: Any) -> Mapping[str, Any]:
        """``factory(**settings it declares)`` as a mapping split -> source (one source serves every split).

        Example:
            >>> sources = DATASETS["synthetic"].build(ways=3, shots=1, queries=2, seed=0, device="cpu")
            >>> sources["train"].sample(2, torch.Generator().manual_seed(0)).support_x.shape
            torch.Size([2, 3, 8])
        """
        unknown = sorted(set(settings) - set(SOURCE_OPTIONS))
        if unknown:
            raise TypeError(f"dataset {self.name}: unknown setting(s) {unknown}; a dataset factory takes "
                            f"{', '.join(SOURCE_OPTIONS)}")
        made = self.factory(**{k: v for k, v in settings.items() if self.accepts(k)})
        if hasattr(made, "sample"):
            return {split: made for split in SPLITS}
        if not isinstance(made, Mapping) or "train" not in made:
            raise TypeError(f"dataset {self.name}: the factory must return a task source (with .sample(meta_batch, "
                            f"generator)) or a mapping with a 'train' source (got {type(made).__name__})")
        return made  # type: ignore[return-value]


DATASETS: dict[str, DatasetSpec] = {}
"""Every dataset ``metafunc train --dataset`` knows by name."""


def register_dataset(name: str, factory: Callable[..., Any], *, defaults: dict[str, Any] | None = None,
                     folder: str | None = None, image_size: int | None = None, files: str = "",
                     description: str = "", replace: bool = False) -> DatasetSpec:
    """Register ``factory(**options) -> {split: source}`` as ``name`` (``metafunc train --dataset name``); its
    ``defaults`` fill the settings a run does not give (:data:`GENERIC_DEFAULTS` for the rest).

    Example:
        >>> spec = register_dataset("blobs", lambda *, ways, shots, queries: GaussianClassification(ways, shots, queries))
        >>> DATASETS["blobs"].build(ways=2, shots=1, queries=1)["val"].sample(1, torch.Generator()).query_y.shape
        torch.Size([1, 2])
        >>> del DATASETS["blobs"]
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_dataset: name must be an identifier such as 'my_data' (got {name!r})")
    if not callable(factory):
        raise TypeError(f"register_dataset: factory must be callable (got {type(factory).__name__})")
    if name in DATASETS and not replace:
        raise ValueError(f"register_dataset: {name!r} is registered already; pass replace=True to override it")
    spec = DatasetSpec(name, factory, {**GENERIC_DEFAULTS, **(defaults or {})}, folder, image_size, files, description)
    DATASETS[name] = spec
    return spec


def dataset_spec(name: str) -> DatasetSpec:
    """The registered dataset ``name``, or for ``module:factory`` a spec over the user's factory.

    Example:
        >>> dataset_spec("sinusoid").defaults["meta_batch"], dataset_spec("metafunc.data.synthetic:GaussianClassification").folder
        (25, None)
    """
    if name in DATASETS:
        return DATASETS[name]
    if ":" in str(name):
        factory = load_attr(name, caller="train", flag="--dataset", what="a factory of task sources by split")
        return DatasetSpec(str(name), factory, dict(GENERIC_DEFAULTS), description="a user's dataset")
    raise ValueError(f"train: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, or pass "
                     "'module:factory' naming your own factory of task sources (see docs/your-own-model.md)")


def data_root(spec: DatasetSpec, root: str | None, *, download: bool = False) -> Path | None:
    """The folder of a dataset's files: ``root``, else ``$METAFUNC_DATA/<folder>``; ``None`` for generated data.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> data_root(DATASETS["omniglot"], folder) == Path(folder), data_root(DATASETS["synthetic"], None)
        (True, None)
    """
    if spec.folder is None:
        return None
    if root is not None:
        path = Path(root).expanduser()
    elif os.environ.get("METAFUNC_DATA"):
        path = Path(os.environ["METAFUNC_DATA"]) / spec.folder
    else:
        raise ValueError(f"train: --dataset {spec.name} needs --data-root, the folder holding its files (e.g. "
                         f"../shared/data/{spec.folder}), or the METAFUNC_DATA variable"
                         + (", and --download to fetch them there" if spec.accepts("download") else ""))
    if download and spec.accepts("download"):
        path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        hint = "; or pass --download to fetch them" if spec.accepts("download") else ""
        raise FileNotFoundError(f"train: data root {str(path)!r} does not exist or is not a folder; pass --data-root "
                                f"pointing at the folder holding {spec.files}{hint}")
    return path


def _sinusoid(*, shots: int, queries: int) -> dict[str, SinusoidSource]:
    return {"train": SinusoidSource(shots, queries), "val": SinusoidSource(shots, queries),
            "test": SinusoidSource(shots, 100)}


def _synthetic(*, ways: int, shots: int, queries: int) -> GaussianClassification:
    return GaussianClassification(ways, shots, queries)


_IMAGE_FILES = {"cifar100": "cifar-100-python.tar.gz", "mini_imagenet": "images/ + train.csv, val.csv, test.csv (or "
                "the mini-imagenet-cache-*.pkl files)", "tiered_imagenet": "{train,val,test}_images_png.pkl and "
                "{split}_labels.pkl"}

register_dataset(
    # The MAML paper's sinusoid setting: 40-40 ReLU MLP, K=10, alpha=0.01, 1 step, 25 tasks, Adam 1e-3, and the
    # reference code's 70,000 meta-iterations (about 3 minutes of training on a 2-core CPU).
    "sinusoid", _sinusoid, description="MAML's sinusoid regression", defaults=dict(
        shots=10, queries=10, meta_batch=25, inner_steps=1, eval_inner_steps=10, inner_lr=0.01, outer_lr=1e-3,
        iterations=70000, val_every=5000, val_episodes=100, checkpoint_every=5000, threads=1, mode="auto", ways=1))
register_dataset(
    # The MAML paper's Omniglot setting: meta-batch 32, alpha=0.4, 1 step in training and 3 at test, Adam 1e-3.
    "omniglot", omniglot_samplers, folder="omniglot", image_size=28, description="Omniglot, the official zips",
    files="images_background_small1.zip / ..._small2.zip", defaults=dict(
        ways=5, shots=1, queries=15, meta_batch=32, inner_steps=1, eval_inner_steps=3, inner_lr=0.4, outer_lr=1e-3,
        iterations=2000, val_every=200, val_episodes=100, checkpoint_every=200, mode="auto"))
register_dataset(
    "synthetic", _synthetic, description="Gaussian clusters in 8 dimensions (smoke tests)", defaults=dict(
        ways=5, shots=1, queries=5, meta_batch=8, inner_steps=1, eval_inner_steps=3, inner_lr=0.4, outer_lr=1e-3,
        iterations=200, val_every=50, val_episodes=40, checkpoint_every=50, width=16, mode="auto"))
# The MAML paper's miniImageNet setting (Conv-4 with 32 filters, alpha=0.01, 5 steps in training and 10 at test,
# meta-batch 4, 60,000 iterations), used for all four image benchmarks.
for _name, _factory, _folder, _size, _text in (
        ("cifar_fs", cifar_fs_samplers, "cifar100", 32, "CIFAR-FS (Bertinetto et al.)"),
        ("fc100", fc100_samplers, "cifar100", 32, "FC100 (Oreshkin et al.)"),
        ("mini_imagenet", mini_imagenet_samplers, "mini_imagenet", 84, "miniImageNet (Ravi and Larochelle)"),
        ("tiered_imagenet", tiered_imagenet_samplers, "tiered_imagenet", 84, "tieredImageNet (Ren et al.)")):
    register_dataset(_name, _factory, folder=_folder, image_size=_size, files=_IMAGE_FILES[_folder],
                     description=_text, defaults=dict(_MAML_IMAGENET))

IMAGE_BENCHMARKS = ("cifar_fs", "fc100", "mini_imagenet", "tiered_imagenet")
"""The standard few-shot image benchmarks (``metafunc.data``): RGB, 32x32 (CIFAR-FS, FC100) or 84x84."""
