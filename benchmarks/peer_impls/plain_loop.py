"""A hand-written ``torch.autograd`` loop: the reference every other implementation must match."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ._common import class_means, grads_of, squared_distances, zero_grads

AVAILABLE, WHY = True, ""


def maml_step(module: nn.Module, tasks, *, inner_lr: float, steps: int, first_order: bool) -> Callable[[], dict]:
    names = [k for k, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    n = tasks.num_tasks

    def step() -> dict[str, Tensor]:
        zero_grads(module)
        for i in range(n):
            sx, sy, qx, qy = (t[i] for t in tasks)
            fast = params
            for _ in range(steps):
                loss = F.cross_entropy(functional_call(module, dict(zip(names, fast)), (sx,)), sy)
                grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
                fast = [p - inner_lr * g for p, g in zip(fast, grads)]
            query = F.cross_entropy(functional_call(module, dict(zip(names, fast)), (qx,)), qy)
            (query / n).backward()
        return grads_of(module)

    return step


def protonet_step(module: nn.Module, tasks) -> Callable[[], dict]:
    n, ways = tasks.num_tasks, int(tasks.support_y.max()) + 1

    def step() -> dict[str, Tensor]:
        zero_grads(module)
        for i in range(n):
            sx, sy, qx, qy = (t[i] for t in tasks)
            centres = class_means(module(sx), sy, ways)
            loss = F.cross_entropy(-squared_distances(module(qx), centres), qy)
            (loss / n).backward()
        return grads_of(module)

    return step
