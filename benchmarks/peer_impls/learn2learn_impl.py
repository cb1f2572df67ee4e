"""learn2learn: ``MAML(module, lr).clone().adapt(loss)``, as in its MAML Omniglot example.

learn2learn 0.2.0 has no wheel for Python 3.11: it was built from the sdist after regenerating its Cython files
(``cython -3 learn2learn/data/*.pyx; pip install --no-deps --no-build-isolation .``). Its top-level ``__init__``
imports torchvision and gym (for datasets and environments this benchmark does not use), and no torchvision build
matches torch 2.13 on PyPI, so only ``learn2learn.algorithms.maml`` and ``learn2learn.utils`` are loaded here, by
registering bare package modules that skip those ``__init__`` files.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import grads_of, zero_grads


def _import_maml():
    try:
        import learn2learn
        return learn2learn.algorithms.MAML
    except ImportError:
        spec = importlib.util.find_spec("learn2learn")
        if spec is None or not spec.submodule_search_locations:
            raise
        root = list(spec.submodule_search_locations)[0]
        for name, path in (("learn2learn", root), ("learn2learn.algorithms", root + "/algorithms")):
            sys.modules.pop(name, None)
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
        from learn2learn.algorithms.maml import MAML
        return MAML


try:
    MAML = _import_maml()
    AVAILABLE, WHY = True, ""
except Exception as error:  # pragma: no cover - optional peer
    AVAILABLE, WHY = False, f"not importable ({type(error).__name__}: {error})"


def maml_step(module: nn.Module, tasks, *, inner_lr: float, steps: int, first_order: bool) -> Callable[[], dict]:
    maml = MAML(module, lr=inner_lr, first_order=first_order)
    n = tasks.num_tasks

    def step() -> dict[str, Tensor]:
        zero_grads(module)
        for i in range(n):
            sx, sy, qx, qy = (t[i] for t in tasks)
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(sx), sy))
            (F.cross_entropy(learner(qx), qy) / n).backward()
        return grads_of(module)

    return step


protonet_step = None  # learn2learn's ProtoNet helpers are the same few tensor ops as the plain loop
