"""higher (facebookresearch/higher): ``innerloop_ctx`` with a differentiable SGD, as in its MAML Omniglot example."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import grads_of, zero_grads

try:
    import higher
    AVAILABLE, WHY = True, ""
except ImportError as error:  # pragma: no cover - optional peer
    AVAILABLE, WHY = False, f"not installed ({error})"


def maml_step(module: nn.Module, tasks, *, inner_lr: float, steps: int, first_order: bool) -> Callable[[], dict]:
    inner_opt = torch.optim.SGD(module.parameters(), lr=inner_lr)
    params = list(module.parameters())
    n = tasks.num_tasks

    def step() -> dict[str, Tensor]:
        zero_grads(module)
        for i in range(n):
            sx, sy, qx, qy = (t[i] for t in tasks)
            with higher.innerloop_ctx(module, inner_opt, copy_initial_weights=False,
                                      track_higher_grads=not first_order) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fmodel(sx), sy))
                query = F.cross_entropy(fmodel(qx), qy) / n
                if first_order:  # higher detaches the fast weights: put their query gradient on the originals
                    for p, g in zip(params, torch.autograd.grad(query, fmodel.parameters())):
                        p.grad = g if p.grad is None else p.grad + g
                else:
                    query.backward()
        return grads_of(module)

    return step


protonet_step = None  # higher differentiates optimisers; a ProtoNet has no inner optimiser (same as the plain loop)
