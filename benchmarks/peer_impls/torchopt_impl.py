"""TorchOpt: ``MetaSGD`` with ``extract_state_dict``/``recover_state_dict``, as in its MAML Omniglot example.

First order uses TorchOpt's functional API (``torchopt.sgd`` on detached inner gradients), since ``MetaSGD`` always
differentiates through its steps.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ._common import grads_of, zero_grads

try:
    import torchopt
    AVAILABLE, WHY = True, ""
except ImportError as error:  # pragma: no cover - optional peer
    AVAILABLE, WHY = False, f"not installed ({error})"


def maml_step(module: nn.Module, tasks, *, inner_lr: float, steps: int, first_order: bool) -> Callable[[], dict]:
    n = tasks.num_tasks
    names = [k for k, _ in module.named_parameters()]
    if first_order:
        optimizer = torchopt.sgd(lr=inner_lr)

        def step() -> dict[str, Tensor]:
            zero_grads(module)
            params = tuple(module.parameters())
            for i in range(n):
                sx, sy, qx, qy = (t[i] for t in tasks)
                fast = params
                state = optimizer.init(fast)
                for _ in range(steps):
                    loss = F.cross_entropy(functional_call(module, dict(zip(names, fast)), (sx,)), sy)
                    grads = tuple(g.detach() for g in torch.autograd.grad(loss, fast))
                    updates, state = optimizer.update(grads, state, inplace=False)
                    fast = torchopt.apply_updates(fast, updates, inplace=False)
                (F.cross_entropy(functional_call(module, dict(zip(names, fast)), (qx,)), qy) / n).backward()
            return grads_of(module)

        return step

    inner_opt = torchopt.MetaSGD(module, lr=inner_lr)

    def step() -> dict[str, Tensor]:
        zero_grads(module)
        net_state = torchopt.extract_state_dict(module)
        opt_state = torchopt.extract_state_dict(inner_opt)
        for i in range(n):
            sx, sy, qx, qy = (t[i] for t in tasks)
            for _ in range(steps):
                inner_opt.step(F.cross_entropy(module(sx), sy))
            (F.cross_entropy(module(qx), qy) / n).backward()
            torchopt.recover_state_dict(module, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        return grads_of(module)

    return step


protonet_step = None  # TorchOpt differentiates optimisers; a ProtoNet has no inner optimiser
