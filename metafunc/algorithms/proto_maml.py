"""ProtoMAML and fo-ProtoMAML (Triantafillou et al., 2020), with the memory-efficient two-pass meta-gradient.

The output layer of each task is initialised from the class prototypes ``c_k`` of the support set embedded by the
base encoder: ``W_k = 2 c_k``, ``b_k = -||c_k||^2``, so that ``logits = -||z - c_k||^2 + ||z||^2`` (negative squared
distances plus a per-example constant). The inner loop then adapts the encoder and this output layer; after it the
output parameters are rewritten ``phi = gamma + stopgrad(phi - gamma)`` (``gamma`` the prototype initialisation), so
the values are unchanged and the query loss differentiates into the prototypes. The initialisation enters the inner
loop detached.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad

from metafunc._shared import check_nonnegative, check_positive, check_steps, under_func_transform
from metafunc.algorithms._metric import WaysResolver, check_ways, metric_checks, one_hot, prototypes
from metafunc.algorithms.base import MetaLearner, check_model, task_metrics
from metafunc.core.functional import thread_safe
from metafunc.core.inner import inner_loop
from metafunc.core.padding import PAD_LABEL, masked_cross_entropy, valid_mask
from metafunc.core.task_function import TaskFunction
from metafunc.core.tree import selector_predicate, tree_detach, tree_straight_through
from metafunc.core.types import AdaptFn, Metrics, ModelFn, Params, Selector, Task

__all__ = ["proto_maml", "fo_proto_maml", "prototype_head", "HEAD_WEIGHT", "HEAD_BIAS"]

HEAD_WEIGHT = "proto_head.weight"
"""Key of the prototype-initialised output weight ``(ways, features)`` in ProtoMAML's task parameters."""
HEAD_BIAS = "proto_head.bias"
"""Key of the prototype-initialised output bias ``(ways,)`` in ProtoMAML's task parameters."""
_HEAD_KEYS = (HEAD_WEIGHT, HEAD_BIAS)


def prototype_head(features: Tensor, labels: Tensor, ways: int) -> tuple[Tensor, Tensor]:
    """ProtoMAML's output layer from the support set: ``(W, b)`` with ``W_k = 2 c_k`` and ``b_k = -||c_k||^2``.

    ``features @ W.T + b`` then equals ``-||z - c_k||^2 + ||z||^2`` for every embedded example ``z``. A class
    without any example among ``labels`` (beyond a task's ways in a padded meta-batch, :mod:`metafunc.core.padding`)
    gets ``W_k = 0`` and the most negative finite ``b_k``: its logit is masked, its probability exactly 0, and no
    gradient of any order reaches it, in the inner loop and after.

    Example:
        >>> w, b = prototype_head(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1]), 2)
        >>> w, b
        (tensor([[2., 0.],
                [0., 4.]]), tensor([-1., -4.]))
    """
    centres = prototypes(features, labels, ways)
    present = one_hot(labels, ways, features.dtype).sum(0) > 0
    return 2 * centres, torch.where(present, -(centres * centres).sum(-1), torch.finfo(features.dtype).min)


def _gradient(fn: Callable[[Params], Any], inputs: Params, *, has_aux: bool = False) -> Any:
    """``torch.func.grad(fn)(inputs)``; outside any ``torch.func`` transform it uses ``torch.autograd.grad`` on
    fresh leaves instead, which (unlike ``torch.func.grad``) keeps no graph for double backward while it runs."""
    if under_func_transform():
        return grad(fn, has_aux=has_aux)(inputs)
    leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
    with torch.enable_grad():
        out = fn(leaves)
        loss, aux = out if has_aux else (out, None)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    tree = {k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(leaves.items(), grads)}
    return (tree, aux) if has_aux else tree


def _linear(features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return features @ weight.transpose(-1, -2) + bias


def _encoder_params(params: Params) -> Params:
    """The encoder's parameters: ``params`` without the output layer."""
    return {k: v for k, v in params.items() if k not in _HEAD_KEYS}


def _inner_lrs(theta: Params, inner_lr: float, head_lr: float) -> dict[str, float]:
    """The inner loop's learning rates: ``head_lr`` on the output layer, ``inner_lr`` on the encoder ``theta``."""
    return {k: (head_lr if k in _HEAD_KEYS else inner_lr) for k in (*theta, *_HEAD_KEYS)}


def _rewrite(phi: Params, gamma: Params) -> Params:
    """``phi = gamma + stopgrad(phi - gamma)`` on the output layer: same values, gradient into the prototypes."""
    return tree_straight_through(gamma, phi)


def _query_metrics(logits: Tensor, loss: Tensor, task: Task, support_losses: Tensor) -> Metrics:
    metrics = task_metrics(logits, task.query_y, loss, True)
    metrics["support_loss"] = support_losses[0]
    return metrics


def _check_options(name: str, *, inner_lr: float, head_lr: float | None, steps: int, first_order: bool,
                   two_pass: bool, query_chunk_size: int | None) -> float:
    """ProtoMAML's eager checks on its settings; returns the output layer's learning rate (``inner_lr`` if None)."""
    check_positive(name, "inner_lr", inner_lr)
    head_lr = check_nonnegative(name, "head_lr", head_lr) if head_lr is not None else float(inner_lr)
    check_steps(name, "steps", steps)
    for flag, value in (("first_order", first_order), ("two_pass", two_pass)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {flag} must be a bool (got {value!r})")
    if two_pass and not first_order:
        raise ValueError(f"{name}: two_pass=True is the first-order gradient path; use fo_proto_maml(..., "
                         "two_pass=True) (second-order ProtoMAML keeps the inner-loop graph)")
    if query_chunk_size is not None:
        check_steps(name, "query_chunk_size", query_chunk_size)
        if not two_pass:
            raise ValueError(f"{name}: query_chunk_size={query_chunk_size} needs two_pass=True (got two_pass=False); "
                             "the single-graph path keeps the prototypes' graph alive for the whole query set")
    return head_lr


def _query_gradient(encoder: ModelFn, phi_encoder: Params, head: Params, task: Task,
                    chunk_size: int | None) -> tuple[Params, Tensor, Tensor, Tensor]:
    """Pass (a)'s query gradient w.r.t. the adapted encoder ``phi_encoder``, the output layer ``head`` held fixed;
    with the query loss, the logits and the detached query features before the output layer.

    The query loss is a mean over queries, so its gradient is the sum of the chunks' gradients of sum-over-chunk / n:
    one chunk's graph at a time, ``chunk_size`` queries each (exact when the encoder treats each example on its own).
    """
    n_query = task.query_x.shape[0]
    n_valid = valid_mask(task.query_y).sum()  # the real queries (all of them without padding)
    size = chunk_size or n_query
    grads: Params = {}
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, n_query, size):
        xq, yq = task.query_x[start:start + size], task.query_y[start:start + size]

        def query_loss(p: Params, xq: Tensor = xq, yq: Tensor = yq) -> tuple[Tensor, tuple[Tensor, ...]]:
            features = encoder(p, xq)
            logits = _linear(features, head[HEAD_WEIGHT], head[HEAD_BIAS])
            part = F.cross_entropy(logits, yq, reduction="sum", ignore_index=PAD_LABEL) / n_valid
            return part, (part.detach(), logits.detach(), features.detach())

        g, part = _gradient(query_loss, phi_encoder, has_aux=True)
        grads = {k: grads[k] + g[k] for k in g} if grads else g
        parts.append(part)
    loss = torch.stack([part[0] for part in parts]).sum()
    logits = torch.cat([part[1] for part in parts])
    features = torch.cat([part[2] for part in parts])
    return grads, loss, logits, features


def _two_pass_meta_loss(encoder: ModelFn, head_of: Callable[[Params, Tensor, Tensor], Params], inner: AdaptFn, *,
                        inner_lr: float, head_lr: float,
                        query_chunk_size: int | None) -> Callable[[Params, Task], tuple[Tensor, Metrics]]:
    """fo-ProtoMAML's two-pass meta-loss (see :func:`fo_proto_maml`): its value is the query loss, its gradient
    w.r.t. the encoder parameters the first-order meta-gradient, with one pass's graph alive at a time."""

    def two_pass_loss(params: Params, task: Task) -> tuple[Tensor, Metrics]:
        theta = _encoder_params(params)
        theta0 = tree_detach(theta)
        # (a) prototypes without a graph, the inner loop, the query loss and its gradient w.r.t. the adapted
        # encoder; keep the detached query features before the output layer.
        with torch.no_grad():
            gamma0 = head_of(theta0, task.support_x, task.support_y)
        phi, losses = inner({**theta0, **gamma0}, task.support_x, task.support_y,
                            lr=_inner_lrs(theta0, inner_lr, head_lr))
        phi = tree_detach(phi)
        head = {k: phi[k] for k in _HEAD_KEYS}
        grads_a, loss, logits, features = _query_gradient(encoder, _encoder_params(phi), head, task,
                                                          query_chunk_size)

        # (b) the prototypes again, with a graph on the base encoder; the rewrite; the stored features through
        # the output layer; backpropagate into the base encoder.
        def prototype_loss(theta_: Params) -> Tensor:
            adapted = _rewrite(head, head_of(theta_, task.support_x, task.support_y))
            return masked_cross_entropy(_linear(features, adapted[HEAD_WEIGHT], adapted[HEAD_BIAS]), task.query_y)

        grads_b = _gradient(prototype_loss, theta0)
        # A loss whose value is the query loss and whose gradient w.r.t. theta is grads_a + grads_b.
        surrogate = loss + sum(((grads_a[k] + grads_b[k]) * (theta[k] - theta0[k])).sum() for k in theta)
        return surrogate, _query_metrics(logits, loss, task, losses)

    return two_pass_loss


def _proto_learner(name: str, encoder: ModelFn, *, ways: WaysResolver,
                   adapt: Callable[..., tuple[Params, Tensor]], logits_of: Callable[[Params, Tensor], Tensor],
                   meta_loss: Callable[[Params, Task], tuple[Tensor, Metrics]], second_order: bool) -> MetaLearner:
    """ProtoMAML's :class:`MetaLearner` from its per-task pieces: evaluation, prediction and the eager checks."""

    def per_task(params: Params, task: Task) -> tuple[Tensor, Metrics]:
        return meta_loss(params, task)

    def evaluate(params: Params, task: Task, *, steps: int | None = None) -> tuple[Tensor, Metrics]:
        phi, losses = adapt(tree_detach(params), task.support_x, task.support_y, steps=steps)
        with torch.no_grad():
            logits = logits_of(tree_detach(phi), task.query_x)
            loss = masked_cross_entropy(logits, task.query_y)
        return loss, _query_metrics(logits, loss, task, losses)

    def predict(task_params: Params, x: Tensor) -> Tensor:
        missing = [k for k in _HEAD_KEYS if k not in task_params]
        if missing:
            raise ValueError(f"{name}: predict needs the task parameters returned by adapt (missing {missing})")
        return logits_of(task_params, x)

    encoder_checks = metric_checks(caller=name, encoder=encoder, ways=ways, encoder_params=_encoder_params,
                                   second_order=second_order, padding=True)

    def validate(params: Params, tasks: Task, vmapped: bool = True, batched: bool = True) -> None:
        clash = [k for k in _HEAD_KEYS if k in params]
        if clash:
            raise ValueError(f"{name}: the encoder parameters must not use the names {clash}, which hold the "
                             "prototype-initialised output layer; rename that submodule")
        encoder_checks(params, tasks, vmapped, batched)

    def safe() -> bool:
        return thread_safe(encoder)

    return MetaLearner(name=name, init=lambda p: dict(p), adapt=adapt,
                       meta_loss=TaskFunction(per_task, validate=validate, thread_safe=safe, name=f"{name}_meta_loss"),
                       evaluate=TaskFunction(evaluate, validate=validate, thread_safe=safe, name=f"{name}_evaluate"),
                       predict=predict, second_order=second_order, model=encoder)


def _proto_maml(name: str, encoder: ModelFn, *, inner_lr: float, head_lr: float | None, steps: int,
                first_order: bool, two_pass: bool, ways: int | None, adapt: Selector,
                query_chunk_size: int | None = None) -> MetaLearner:
    check_model(encoder, name)
    head_lr = _check_options(name, inner_lr=inner_lr, head_lr=head_lr, steps=steps, first_order=first_order,
                             two_pass=two_pass, query_chunk_size=query_chunk_size)
    resolve_ways = WaysResolver(name, check_ways(name, ways))
    adapts_encoder = selector_predicate(adapt, name)

    def head_of(theta: Params, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        weight, bias = prototype_head(encoder(theta, x), y, resolve_ways(y))
        return {HEAD_WEIGHT: weight, HEAD_BIAS: bias}

    def logits_of(phi: Params, x: Tensor) -> Tensor:
        return _linear(encoder(_encoder_params(phi), x), phi[HEAD_WEIGHT], phi[HEAD_BIAS])

    def task_loss(phi: Params, x: Tensor, y: Tensor) -> Tensor:
        return masked_cross_entropy(logits_of(phi, x), y)

    inner = inner_loop(task_loss, steps=steps, first_order=first_order,
                       adapt=lambda k: k in _HEAD_KEYS or adapts_encoder(k))

    def adapt_task(params: Params, x: Tensor, y: Tensor, *, steps: int | None = None) -> tuple[Params, Tensor]:
        """The prototype head ``gamma``, the inner loop from ``theta`` and the detached ``gamma`` (the encoder
        re-attached with ``d phi / d theta = I`` when first order), then the rewrite of the output layer."""
        if steps is not None:
            check_steps(name, "steps", steps)
        theta = _encoder_params(params)
        gamma = head_of(theta, x, y)
        lrs = _inner_lrs(theta, inner_lr, head_lr)
        start = {**(tree_detach(theta) if first_order else theta), **tree_detach(gamma)}
        phi, losses = inner(start, x, y, lr=lrs, steps=steps)
        if first_order:  # d phi / d theta = I
            phi = tree_straight_through(theta, phi)
        return _rewrite(phi, gamma), losses

    def single_graph_loss(params: Params, task: Task) -> tuple[Tensor, Metrics]:
        phi, losses = adapt_task(params, task.support_x, task.support_y)
        logits = logits_of(phi, task.query_x)
        loss = masked_cross_entropy(logits, task.query_y)
        return loss, _query_metrics(logits, loss, task, losses)

    if two_pass:
        meta_loss = _two_pass_meta_loss(encoder, head_of, inner, inner_lr=inner_lr, head_lr=head_lr,
                                        query_chunk_size=query_chunk_size)
    else:
        meta_loss = single_graph_loss
    return _proto_learner(name, encoder, ways=resolve_ways, adapt=adapt_task, logits_of=logits_of,
                          meta_loss=meta_loss, second_order=not first_order)


def proto_maml(encoder: ModelFn, *, inner_lr: float = 0.1, head_lr: float | None = None, steps: int = 1,
               ways: int | None = None, first_order: bool = False, adapt: Selector = None) -> MetaLearner:
    """ProtoMAML (Triantafillou et al., 2020): MAML over ``encoder`` plus an output layer initialised per task from
    the support prototypes (``W_k = 2 c_k``, ``b_k = -||c_k||^2``), with the exact second-order meta-gradient
    through ``steps`` inner SGD steps.

    The inner loop adapts the encoder parameters chosen by ``adapt`` (all by default) with ``inner_lr`` and the
    output layer (``"proto_head.weight"``, ``"proto_head.bias"`` in the task parameters) with ``head_lr`` (defaults
    to ``inner_lr``; ``head_lr=0`` holds the output layer at its prototype initialisation, BOIL's inner loop). The output layer starts detached and is rewritten ``gamma + stopgrad(phi - gamma)`` after the
    loop, so the meta-gradient reaches the encoder through the adapted encoder and through the prototypes.
    ``first_order=True`` is :func:`fo_proto_maml`.

    Example:
        >>> import torch
        >>> from metafunc import Task, apply_grads, functionalize, meta_value_and_grad
        >>> encoder, params = functionalize(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()))
        >>> learner = proto_maml(encoder, inner_lr=0.1, head_lr=0.5, steps=2)
        >>> tasks = Task(torch.randn(2, 6, 4), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2),
        ...              torch.randn(2, 3, 4), torch.tensor([[0, 1, 2]] * 2))
        >>> loss, metrics, grads = meta_value_and_grad(learner)(params, tasks)
        >>> apply_grads(params, grads)  # then optimizer.step()
    """
    return _proto_maml("fo_proto_maml" if first_order else "proto_maml", encoder, inner_lr=inner_lr,
                       head_lr=head_lr, steps=steps, first_order=first_order, two_pass=False, ways=ways, adapt=adapt)


def fo_proto_maml(encoder: ModelFn, *, inner_lr: float = 0.1, head_lr: float | None = None, steps: int = 1,
                  ways: int | None = None, two_pass: bool = False, adapt: Selector = None,
                  query_chunk_size: int | None = None) -> MetaLearner:
    """fo-ProtoMAML: first order in the inner loop (``d phi / d theta = I``), exact through the prototypes.

    ``two_pass=True`` computes the same meta-gradient with only one graph alive at a time: (a) prototypes without a
    graph, the inner loop, the query loss and its gradient w.r.t. the adapted encoder, keeping the detached query
    features; (b) the prototypes again with a graph, the output-layer rewrite, the stored features through the
    output layer, backpropagated into the encoder; the sum of (a) and (b). Both gradients are taken inside
    ``meta_loss``, which returns a loss whose value is the query loss and whose gradient w.r.t. the parameters is
    that meta-gradient, so ``meta_value_and_grad`` and ``meta_batch`` (vmap or loop) work as usual. Its derivatives of
    order two and higher are not those of the query loss (it is a first-order method). Costs one more encoder
    forward over the support set. The memory saving is largest with ``meta_batch(..., mode="loop")``: there the
    two gradients use ``torch.autograd.grad``; under ``vmap`` (or inside ``torch.func.grad``) they use
    :func:`torch.func.grad`, which keeps each pass's graph differentiable while it runs.

    ``query_chunk_size`` (two-pass only) takes pass (a)'s query gradient over that many queries at a time, so only
    one chunk's graph is alive; the single-graph path cannot, as the prototypes' graph must live through the whole
    query set. It is the same gradient only for an encoder that treats each example on its own (a transformer,
    LayerNorm, GroupNorm, InstanceNorm, a Conv-4 without norm); with batch statistics (BatchNorm in training
    mode) each chunk would be normalised by its own statistics, a different function.

    Example:
        >>> import torch
        >>> from metafunc import Task, apply_grads, functionalize, meta_value_and_grad
        >>> encoder, params = functionalize(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()))
        >>> learner = fo_proto_maml(encoder, inner_lr=0.1, steps=3, two_pass=True)
        >>> tasks = Task(torch.randn(2, 6, 4), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2),
        ...              torch.randn(2, 3, 4), torch.tensor([[0, 1, 2]] * 2))
        >>> loss, metrics, grads = meta_value_and_grad(learner)(params, tasks)
        >>> apply_grads(params, grads)  # then optimizer.step()
    """
    return _proto_maml("fo_proto_maml", encoder, inner_lr=inner_lr, head_lr=head_lr, steps=steps, first_order=True,
                       two_pass=two_pass, ways=ways, adapt=adapt, query_chunk_size=query_chunk_size)
