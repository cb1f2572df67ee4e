"""Checkpointed exact MAML: the exact second-order meta-gradient of a long inner loop in bounded memory."""

from __future__ import annotations

import math
from typing import Callable

from torch import Tensor
from torch.func import grad_and_value

from metafunc._shared import check_choice, check_positive, check_steps
from metafunc.algorithms.base import (
    LossSpec,
    MetaLearner,
    check_model,
    make_learner,
    resolve_loss,
    task_metrics,
)
from metafunc.core.inner import first_order as first_order_transform
from metafunc.core.inner import inner_loop
from metafunc.core.task_function import TaskFunction
from metafunc.core.tree import select, tree_detach
from metafunc.core.types import Metrics, ModelFn, Params, Selector, Task
from metafunc.gradients._common import (
    HVP_MODES,
    TaskLoss,
    attach_gradient,
    clip_tree,
    make_step,
    make_step_pullback,
    make_task_loss,
)

__all__ = ["checkpointed_maml", "checkpoint_positions", "default_checkpoints"]


def default_checkpoints(steps: int) -> int:
    """The default number of stored checkpoints for ``steps`` inner steps: ``ceil(sqrt(steps))``.

    Example:
        >>> default_checkpoints(100)
        10
    """
    return max(1, math.ceil(math.sqrt(steps)))


def checkpoint_positions(steps: int, checkpoints: int) -> list[int]:
    """The inner steps whose parameters are kept: ``checkpoints`` evenly spaced positions starting at 0.

    Example:
        >>> checkpoint_positions(10, 3)
        [0, 3, 7]
    """
    check_steps("checkpoint_positions", "steps", steps)
    _check_checkpoints("checkpoint_positions", checkpoints, steps)
    return sorted({round(j * steps / checkpoints) for j in range(checkpoints)})


def _check_checkpoints(caller: str, checkpoints: int, steps: int) -> None:
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, int):
        raise TypeError(f"{caller}: checkpoints must be an int (got {type(checkpoints).__name__} {checkpoints!r})")
    if not 1 <= checkpoints <= steps:
        raise ValueError(
            f"{caller}: checkpoints must be between 1 and steps={steps} (got {checkpoints}); "
            f"leave it as None for ceil(sqrt(steps)) = {default_checkpoints(steps)}"
        )


def _forward_keeping_checkpoints(step: Callable[[Params, Tensor, Tensor], Params],
                                 task_loss: TaskLoss, params: Params, x: Tensor, y: Tensor, *, steps: int,
                                 kept: set[int]) -> tuple[Params, dict[int, Params], Tensor | None]:
    """The inner loop without a graph: the adapted parameters, the parameters at the steps in ``kept`` (the
    checkpoints, by step) and the support loss before the first step."""
    phi = tree_detach(params)
    saved: dict[int, Params] = {}
    support_loss = None
    for i in range(steps):
        if i in kept:
            saved[i] = phi
        if i == 0:
            support_loss = task_loss(phi, x, y).detach()
        phi = step(phi, x, y)
    return phi, saved, support_loss


def _carry_back(v: Params, saved: dict[int, Params], step: Callable[[Params, Tensor, Tensor], Params],
                pullback: Callable[[Params, Params, Tensor, Tensor], Params], x: Tensor, y: Tensor, *,
                positions: list[int], steps: int, names: list[str], clip_norm: float | None) -> Params:
    """Carry the query gradient ``v`` back through the inner loop: recompute each segment forward from its
    checkpoint in ``saved`` (which it empties), then pull ``v`` back one step at a time, clipping its adapted part
    to ``clip_norm`` after every step if given."""
    bounds = positions + [steps]
    for j in range(len(positions) - 1, -1, -1):
        start, end = bounds[j], bounds[j + 1]
        segment = [saved.pop(start)]
        for _ in range(start, end - 1):
            segment.append(step(segment[-1], x, y))
        for phi_i in reversed(segment):
            v = pullback(phi_i, v, x, y)
            if clip_norm is not None:
                v = {**v, **clip_tree({k: v[k] for k in names}, clip_norm)}
        del segment
    return v


def checkpointed_maml(
    model: ModelFn,
    *,
    inner_lr: float = 0.4,
    steps: int = 1,
    loss: LossSpec = "cross_entropy",
    checkpoints: int | None = None,
    clip_norm: float | None = None,
    adapt: Selector = None,
    hvp: str = "reverse",
) -> MetaLearner:
    """Exact MAML through ``steps`` inner SGD steps with memory that does not grow with every step's activations.

    ``meta_loss(params, task)`` runs the inner loop without a graph, keeping the parameters at ``checkpoints``
    evenly spaced steps (default ``ceil(sqrt(steps))``). It then takes the query gradient ``v = dL_q/dphi_k`` and
    walks backwards: each segment between two checkpoints is recomputed forward (parameters only, no graph), and the
    signal is carried back one step at a time with the vector-Jacobian product of the step,
    ``v <- v - inner_lr * H_s(phi_i) v`` (parameters outside ``adapt`` also collect their mixed second
    derivatives). At any time memory holds the checkpoints, one segment of parameters and one Hessian-vector
    product: ``O(checkpoints + steps / checkpoints)`` parameter copies instead of ``steps`` graphs of activations.

    ``hvp="reverse"`` (the default) takes ``torch.func.vjp`` of the step (reverse-over-reverse: the graph of the
    step's backward pass is kept for a second backward). ``hvp="forward"`` computes each ``H v`` forward-over-reverse,
    ``torch.func.jvp`` of ``torch.func.grad``, with no graph of the backward pass; the mixed terms come from the
    symmetry of the Hessian. Both give the same gradient; which is leaner depends on the model and the device: on
    ResNet-18 at 224x224 on the CPU, forward mode peaked higher than reverse mode (4,573 against 2,727 MiB at 5
    steps, in separate runs; ``benchmarks/RESULTS.md``).

    ``clip_norm`` clips the norm of the backward signal ``v`` at every step (per task), as the memory-efficient
    MAML notebook does for very long horizons; the gradient is then no longer exact. The meta-gradient is computed
    with respect to the model parameters only; ``learner.adapt`` returns the adapted parameters with a first-order
    (identity) derivative.

    Example:
        >>> import torch
        >>> from metafunc import apply_grads, functionalize, meta_value_and_grad, models, sinusoid_tasks
        >>> model, params = functionalize(models.mlp())
        >>> learner = checkpointed_maml(model, inner_lr=0.01, steps=100, loss="mse", checkpoints=10, hvp="reverse")
        >>> tasks = sinusoid_tasks(4, shots=10, generator=torch.Generator().manual_seed(0))
        >>> loss, metrics, grads = meta_value_and_grad(learner)(params, tasks)
        >>> apply_grads(params, grads)  # then optimizer.step()
    """
    name = "checkpointed_maml"
    check_model(model, name)
    check_positive(name, "inner_lr", inner_lr)
    check_steps(name, "steps", steps)
    if checkpoints is None:
        checkpoints = default_checkpoints(steps)
    _check_checkpoints(name, checkpoints, steps)
    if clip_norm is not None:
        clip_norm = check_positive(name, "clip_norm", clip_norm)
    check_choice(name, "hvp", hvp, HVP_MODES)
    loss_fn, classification = resolve_loss(loss, name)
    task_loss = make_task_loss(model, loss_fn)
    positions = checkpoint_positions(steps, checkpoints)
    kept = set(positions)
    lr = float(inner_lr)

    adapt_fn = first_order_transform(inner_loop(task_loss, steps=steps, lr=lr, adapt=adapt))
    learner = make_learner(name=name, model=model, adapt=adapt_fn, loss_fn=loss_fn, classification=classification,
                           second_order=True)

    def meta_loss(params: Params, task: Task) -> tuple[Tensor, Metrics]:
        names = select(params, adapt, caller=name)
        step = make_step(task_loss, names, lr)
        pullback = make_step_pullback(task_loss, names, lr, hvp)
        x, y = task.support_x, task.support_y

        phi, saved, support_loss = _forward_keeping_checkpoints(step, task_loss, params, x, y, steps=steps, kept=kept)

        def query(p: Params) -> tuple[Tensor, Tensor]:
            prediction = model(p, task.query_x)
            return loss_fn(prediction, task.query_y), prediction

        v, (query_loss, prediction) = grad_and_value(query, has_aux=True)(phi)
        del phi
        v = _carry_back(v, saved, step, pullback, x, y, positions=positions, steps=steps, names=names,
                        clip_norm=clip_norm)

        metrics = task_metrics(prediction, task.query_y, query_loss, classification)
        metrics["support_loss"] = support_loss  # type: ignore[assignment]
        return attach_gradient(params, query_loss, v), metrics

    return learner._replace(meta_loss=TaskFunction(
        meta_loss, name=f"{name}_meta_loss", thread_safe=learner.meta_loss.thread_safe,
        validate=learner.meta_loss.validate))
