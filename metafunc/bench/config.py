"""What a benchmark run measures: :class:`BenchConfig`, the model it builds and how it measures memory.

Example:
    >>> memory_method(BenchConfig(device="cpu")), memory_method(BenchConfig(memory="none"))
    ('rss', 'none')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from metafunc._shared import load_attr
from metafunc.core.batching import Mode
from metafunc.registry import path_names

__all__ = ["BenchConfig", "build_model", "memory_method", "MODELS", "MEMORY_METHODS"]

MODELS = ("conv4", "resnet18", "mlp")
"""Built-in models; anything else is ``module:attr``, a factory returning an ``nn.Module``."""

MEMORY_METHODS = ("auto", "rss", "cuda", "none")
"""``auto`` = ``cuda`` on a GPU and ``rss`` (a subprocess per case) on a CPU."""


@dataclass
class BenchConfig:
    """One benchmark run: which model, which paths, which inner-loop lengths, how to measure.

    Example:
        >>> BenchConfig(model="mlp", paths=["exact"], inner_steps=[1]).meta_batch
        16
    """

    model: str = "conv4"
    paths: list[str] = field(default_factory=path_names)
    inner_steps: list[int] = field(default_factory=lambda: [1, 5, 20, 100])
    meta_batch: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    ways: int = 5
    shots: int = 1
    query: int = 15
    image_size: int | None = None
    width: int | None = None
    input_shape: list[int] | None = None
    inner_lr: float = 0.1
    repeats: int = 3
    warmup: int = 1
    mode: Mode = "auto"
    memory: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


def memory_method(cfg: BenchConfig) -> str:
    """How ``cfg`` measures memory: ``cfg.memory``, with ``auto`` resolved to ``cuda`` on a GPU and ``rss`` on a CPU.

    Example:
        >>> memory_method(BenchConfig(device="cuda"))
        'cuda'
    """
    if cfg.memory != "auto":
        return cfg.memory
    return "cuda" if cfg.device.startswith("cuda") else "rss"


def _user_model(cfg: BenchConfig) -> tuple[nn.Module, tuple[int, ...]]:
    """``cfg.model`` as ``module:attr``: the factory's module (torch norm layers converted) and ``--input-shape``."""
    from metafunc.nn.norm import convert_norm_layers, find_torch_norm_layers

    if ":" not in cfg.model:
        raise ValueError(f"metafunc bench: --model must be one of {', '.join(MODELS)} or 'module:attr' naming a "
                         f"factory that returns an nn.Module (got {cfg.model!r})")
    factory = load_attr(cfg.model, caller="metafunc bench", flag="--model", what="a factory returning an nn.Module")
    if not cfg.input_shape:
        raise ValueError(f"metafunc bench: --model {cfg.model!r} needs --input-shape (one example's shape, "
                         "e.g. 3,32,32)")
    try:
        module = factory()
    except TypeError as e:
        raise ValueError(f"metafunc bench: --model {cfg.model!r} must be callable with no arguments ({e})") from e
    if not isinstance(module, nn.Module):
        raise ValueError(f"metafunc bench: --model {cfg.model!r} returned {type(module).__name__}, not an nn.Module")
    if find_torch_norm_layers(module):
        module = convert_norm_layers(module)
    return module, tuple(cfg.input_shape)


def build_model(cfg: BenchConfig) -> tuple[nn.Module, tuple[int, ...]]:
    """The module and the shape of one input example for ``cfg.model``.

    Torch norm layers in a user's module are swapped for metafunc's exact ones (second-order gradients of torch's
    fused kernels are wrong under ``vmap`` on torch 2.13).

    Example:
        >>> net, shape = build_model(BenchConfig(model="mlp"))
        >>> shape
        (32,)
    """
    from metafunc.nn import models
    from metafunc.nn.resnet import resnet18

    if cfg.model == "conv4":
        size = cfg.image_size or 28
        channels = 1 if size < 64 else 3
        return models.conv4(cfg.ways, in_channels=channels, width=cfg.width or 64, image_size=size), (channels, size, size)
    if cfg.model == "resnet18":
        size = cfg.image_size or (224 if cfg.device.startswith("cuda") else 32)
        variant = "imagenet" if size >= 128 else "small"
        return resnet18(cfg.ways, variant=variant, width=cfg.width or 64), (3, size, size)  # type: ignore[arg-type]
    if cfg.model == "mlp":
        width = cfg.width or 64
        return models.mlp(32, (width, width), cfg.ways, norm="layer"), (32,)
    return _user_model(cfg)
