"""``sharded(step)``: any meta-step of the ``step(params, tasks) -> (loss, metrics, grads)`` contract, run on this
rank's share of the meta-batch and all-reduced into the whole meta-batch's ``(loss, metrics, grads)``.

Example:
    >>> sharded(lambda params, tasks: None).__name__
    'sharded_<lambda>'
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from metafunc.core.types import Metrics, Params, Task, check_task
from metafunc.distributed.collectives import weighted_all_reduce

__all__ = ["sharded"]

MetaStepFn = Callable[[Params, Task], tuple[Tensor, Metrics, Params]]


def _check_params(params: Any) -> Params:
    if not isinstance(params, dict) or not params:
        raise TypeError("sharded: params must be a non-empty dict of tensors, as from functionalize "
                        f"(got {type(params).__name__})")
    bad = [k for k, v in params.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"sharded: params must hold tensors; {bad[:5]} are not")
    return params


def _check_out(out: Any) -> tuple[Tensor, Metrics, Params]:
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], dict)):
        raise TypeError("sharded: step must return (loss, metrics, grads) with grads a dict like params, as "
                        f"metafunc.meta_value_and_grad does (got {type(out).__name__})")
    return out


def _reduce(loss: Tensor, metrics: Metrics, grads: Params, num_tasks: int,
            group: Any) -> tuple[Tensor, Metrics, Params]:
    """The whole meta-batch's means: every rank's values weighted by its number of tasks, in one all-reduce per
    dtype (the loss and the metrics travel in float64)."""
    names, keys = list(grads), sorted(metrics)
    scalars = torch.stack([torch.as_tensor(v).detach().to(device=loss.device, dtype=torch.float64).reshape(())
                           for v in [loss, *(metrics[k] for k in keys)]])
    what = f"all_reduce of the meta-gradient ({sum(g.numel() for g in grads.values())} values)"
    *reduced, means = weighted_all_reduce([grads[k] for k in names] + [scalars], num_tasks, group=group, what=what)
    whole_metrics = {k: means[j + 1].to(dtype=torch.as_tensor(metrics[k]).dtype,
                                        device=torch.as_tensor(metrics[k]).device) for j, k in enumerate(keys)}
    return means[0].to(dtype=loss.dtype), whole_metrics, dict(zip(names, reduced))


def sharded(step: MetaStepFn, *, group: Any = None) -> MetaStepFn:
    """Distribute any meta-step: ``sharded(step)(params, shard)`` runs ``step`` on this rank's share of the
    meta-batch, then one all-reduce weighted by the number of tasks on each rank, and returns ``(loss, metrics,
    grads)`` of the **whole** meta-batch on every rank: the same numbers as ``step`` on the whole meta-batch in one
    process (uneven shards too), up to the order of a floating-point sum.

    ``step`` is any meta-step of the ``step(params, tasks) -> (loss, metrics, grads)`` contract
    (:func:`metafunc.meta_value_and_grad`, :func:`metafunc.compiled_meta_step`, or your own, e.g. one that calls
    ``loss.backward()`` and returns ``{name: p.grad}``). In a single process nothing is communicated.

    Example:
        >>> from metafunc import functionalize, maml, meta_value_and_grad, sinusoid_tasks
        >>> model, params = functionalize(torch.nn.Linear(1, 1))
        >>> step = sharded(meta_value_and_grad(maml(model, inner_lr=0.01, loss="mse")))
        >>> tasks = sinusoid_tasks(4, shots=5, generator=torch.Generator().manual_seed(0))
        >>> loss, metrics, grads = step(params, tasks)
        >>> sorted(grads) == sorted(params)
        True
    """
    if not callable(step):
        raise TypeError(f"sharded: step must be a meta-step step(params, tasks) -> (loss, metrics, grads) "
                        f"(got {type(step).__name__})")

    def run(params: Params, tasks: Task) -> tuple[Tensor, Metrics, Params]:
        _check_params(params)
        tasks = check_task(tasks, caller="sharded")
        loss, metrics, grads = _check_out(step(params, tasks))
        return _reduce(loss, dict(metrics), grads, tasks.num_tasks, group)

    run.__name__ = f"sharded_{getattr(step, '__name__', 'step')}"
    return run
