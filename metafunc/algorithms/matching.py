"""Matching Networks (Vinyals et al., 2016): attention over the embedded support set (cosine similarity or negative
squared Euclidean distance, over a fixed or learned temperature), with optional full context embeddings (a
bidirectional LSTM over the support set and an attention LSTM over each query)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from metafunc._shared import check_choice, check_positive, check_steps
from metafunc.algorithms._metric import WaysResolver, check_ways, metric_objectives, one_hot, squared_distances
from metafunc.algorithms.base import MetaLearner, check_model, task_metrics
from metafunc.core.types import Metrics, ModelFn, Params, Task

__all__ = ["matching_net", "FCE_PREFIX", "LOG_TEMPERATURE_KEY", "SUPPORT_FEATURES_KEY", "SUPPORT_LABELS_KEY",
           "DISTANCES"]

FCE_PREFIX = "fce/"
"""Full-context-embedding LSTM parameters live under ``"fce/"`` in the meta-parameters (made by ``learner.init``)."""
LOG_TEMPERATURE_KEY = "matching/log_temperature"
"""``matching_net(learn_temperature=True)`` keeps the log of its temperature under this key in the meta-parameters
(a scalar made by ``learner.init`` from ``temperature``), so the outer optimizer learns it."""
DISTANCES = ("cosine", "squared_euclidean")
"""``matching_net``'s ``distance=``: cosine similarity (the paper's) or negative squared Euclidean distance."""
SUPPORT_FEATURES_KEY = "support/features"
"""``matching_net``'s ``adapt`` stores the (context-)embedded support set under this key."""
SUPPORT_LABELS_KEY = "support/labels"
"""... and the one-hot support labels under this key."""

_FCE_SHAPES = {  # name -> shape in units of the feature dimension d (4d gates)
    "g_fwd.weight_ih": (4, 1), "g_fwd.weight_hh": (4, 1), "g_fwd.bias": (4,),
    "g_bwd.weight_ih": (4, 1), "g_bwd.weight_hh": (4, 1), "g_bwd.bias": (4,),
    "f.weight_ih": (4, 1), "f.weight_hh": (4, 2), "f.bias": (4,),
}


def _lstm_cell(p: Params, prefix: str, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    gates = x @ p[prefix + "weight_ih"].T + h @ p[prefix + "weight_hh"].T + p[prefix + "bias"]
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _context_support(p: Params, z: Tensor) -> Tensor:
    """g(x_i) = z_i + h_fwd_i + h_bwd_i: a bidirectional LSTM over the support sequence, with a skip connection."""
    zero = z.new_zeros(1, z.shape[-1])
    forward, backward = [], []
    h, c = zero, zero
    for i in range(z.shape[0]):
        h, c = _lstm_cell(p, FCE_PREFIX + "g_fwd.", z[i:i + 1], h, c)
        forward.append(h)
    h, c = zero, zero
    for i in reversed(range(z.shape[0])):
        h, c = _lstm_cell(p, FCE_PREFIX + "g_bwd.", z[i:i + 1], h, c)
        backward.append(h)
    return z + torch.cat(forward) + torch.cat(backward[::-1])


def _context_query(p: Params, z: Tensor, support: Tensor, steps: int) -> Tensor:
    """f(x) after ``steps`` reads of an attention LSTM over the context-embedded support set."""
    h = torch.zeros_like(z)
    r = torch.zeros_like(z)
    c = torch.zeros_like(z)
    for _ in range(steps):
        h_hat, c = _lstm_cell(p, FCE_PREFIX + "f.", z, torch.cat([h, r], dim=-1), c)
        h = h_hat + z
        r = torch.softmax(h @ support.T, dim=-1) @ support
    return h


def _similarities(query: Tensor, support: Tensor, distance: str) -> Tensor:
    """``(queries, support)`` similarities: cosines, or negative squared Euclidean distances."""
    if distance == "cosine":
        return F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).T
    return -squared_distances(query, support)


def _class_log_probs(logits: Tensor, onehot: Tensor) -> Tensor:
    """``log(softmax(logits) @ onehot)``, ``(queries, ways)``, computed as a log-sum-exp over each class's support
    examples minus one over all of them, so that far-away classes (large squared distances) give finite log
    probabilities instead of ``log(0)``. Every class has a support example (checked eagerly)."""
    mask = torch.zeros_like(onehot).masked_fill(onehot == 0, float("-inf"))  # log(onehot)
    per_class = torch.logsumexp(logits.unsqueeze(-1) + mask, dim=-2)
    return per_class - torch.logsumexp(logits, dim=-1, keepdim=True)


@dataclass(frozen=True)
class _Options:
    """``matching_net``'s settings, as given (checked by :func:`_check_options`)."""

    temperature: float
    distance: str
    learn_temperature: bool
    fce: bool
    feature_dim: int | None
    fce_steps: int
    fce_seed: int


def _check_options(name: str, options: _Options) -> None:
    """``matching_net``'s eager checks on its settings (before any transform runs)."""
    check_positive(name, "temperature", options.temperature)
    check_choice(name, "distance", options.distance, DISTANCES)
    for flag, value in (("fce", options.fce), ("learn_temperature", options.learn_temperature)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {flag} must be a bool (got {value!r})")
    if options.fce:
        if options.feature_dim is None:
            raise ValueError(f"{name}: fce=True needs feature_dim= (the encoder's output width) to build the LSTMs")
        check_steps(name, "feature_dim", options.feature_dim)
        check_steps(name, "fce_steps", options.fce_steps)


def _encoder_params(params: Params) -> Params:
    """The encoder's parameters: ``params`` without the LSTMs, the stored support set and the log-temperature."""
    return {k: v for k, v in params.items() if not k.startswith((FCE_PREFIX, "support/")) and k != LOG_TEMPERATURE_KEY}


def _initial_log_temperature(temperature: float, ref: Tensor) -> Tensor:
    """The learned temperature's starting point: the scalar leaf ``log(temperature)``, in ``ref``'s dtype/device."""
    log_t = torch.tensor(math.log(temperature), dtype=ref.dtype, device=ref.device)
    return log_t.requires_grad_(True)


def _fce_params(feature_dim: int, seed: int, ref: Tensor) -> Params:
    """The full-context-embedding LSTMs' parameters, uniform in ``+-1/sqrt(feature_dim)`` (drawn in float64 from
    ``seed``, then cast to ``ref``'s dtype/device), keyed under :data:`FCE_PREFIX`."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(feature_dim)
    params: Params = {}
    for key, units in _FCE_SHAPES.items():
        shape = tuple(u * feature_dim for u in units)
        value = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        params[FCE_PREFIX + key] = value.to(dtype=ref.dtype, device=ref.device).requires_grad_(True)
    return params


def _init(params: Params, options: _Options) -> Params:
    """``learner.init``: ``params`` plus the log-temperature (if learned) and the FCE LSTMs (if ``fce``)."""
    params = dict(params)
    ref = next(iter(params.values()))
    if options.learn_temperature:
        params[LOG_TEMPERATURE_KEY] = _initial_log_temperature(options.temperature, ref)
    if options.fce:
        params.update(_fce_params(cast(int, options.feature_dim), options.fce_seed, ref))
    return params


def _check_meta_params(name: str, params: Params, options: _Options) -> None:
    """The meta-parameters hold what ``learner.init`` adds: the log-temperature and the FCE LSTMs when asked for."""
    if options.learn_temperature and LOG_TEMPERATURE_KEY not in params:
        raise ValueError(f"{name}: learn_temperature=True but the meta-parameters lack {LOG_TEMPERATURE_KEY!r}; "
                         "build them with learner.init(params)")
    if options.fce:
        missing = [FCE_PREFIX + k for k in _FCE_SHAPES if FCE_PREFIX + k not in params]
        if missing:
            raise ValueError(f"{name}: the meta-parameters lack the full-context-embedding parameters "
                             f"{missing[:3]}; build them with learner.init(params)")


def _scaled(similarity: Tensor, params: Params, options: _Options) -> Tensor:
    """``similarity / T``: the learned ``T = exp(params[LOG_TEMPERATURE_KEY])``, or the fixed ``temperature``."""
    if options.learn_temperature:
        return similarity * torch.exp(-params[LOG_TEMPERATURE_KEY])
    return similarity / options.temperature


def _log_probs(params: Params, support: Tensor, onehot: Tensor, query: Tensor, options: _Options) -> Tensor:
    """The queries' class log-probabilities, ``(queries, ways)``: attention over the (context-)embedded support set
    (the queries read it through the attention LSTM first if ``fce``), its labels ``onehot``."""
    if options.fce:
        query = _context_query(params, query, support, options.fce_steps)
    logits = _scaled(_similarities(query, support, options.distance), params, options)
    return _class_log_probs(logits, onehot)


def _embed(encoder: ModelFn, params: Params, support_x: Tensor, query_x: Tensor,
           fce: bool) -> tuple[Tensor, Tensor]:
    """The embedded support set (through the bidirectional LSTM if ``fce``) and the embedded queries."""
    theta = _encoder_params(params)
    support, query = encoder(theta, support_x), encoder(theta, query_x)
    if fce:
        support = _context_support(params, support)
    return support, query


def _matching_learner(name: str, encoder: ModelFn, resolve_ways: WaysResolver, options: _Options) -> MetaLearner:
    """The learner: ``adapt`` stores the embedded support set, ``meta_loss``/``evaluate`` score the queries against
    it, ``predict`` reads it back; each checks the meta-parameters :func:`_init` makes."""

    def adapt(params: Params, x: Tensor, y: Tensor, *, steps: int | None = None) -> tuple[Params, Tensor]:
        _check_meta_params(name, params, options)
        support, _ = _embed(encoder, params, x, x[:1], options.fce)
        onehot = one_hot(y, resolve_ways(y), support.dtype)
        task_params = {**params, SUPPORT_FEATURES_KEY: support, SUPPORT_LABELS_KEY: onehot}
        query = encoder(_encoder_params(params), x)
        support_loss = F.nll_loss(_log_probs(params, support, onehot, query, options), y)
        return task_params, support_loss.detach().reshape(1)

    def score(params: Params, task: Task) -> tuple[Tensor, Metrics]:
        _check_meta_params(name, params, options)
        support, query = _embed(encoder, params, task.support_x, task.query_x, options.fce)
        onehot = one_hot(task.support_y, resolve_ways(task.support_y), support.dtype)
        out = _log_probs(params, support, onehot, query, options)
        loss = F.nll_loss(out, task.query_y)
        return loss, task_metrics(out, task.query_y, loss, True)

    def predict(task_params: Params, x: Tensor) -> Tensor:
        if SUPPORT_FEATURES_KEY not in task_params:
            raise ValueError(f"{name}: predict needs the task parameters returned by adapt "
                             f"(no {SUPPORT_FEATURES_KEY!r} key)")
        query = encoder(_encoder_params(task_params), x)
        return _log_probs(task_params, task_params[SUPPORT_FEATURES_KEY], task_params[SUPPORT_LABELS_KEY], query,
                          options)

    def init(params: Params) -> Params:
        return _init(params, options)

    def meta_params_check(params: Params, tasks: Task, vmapped: bool = True, batched: bool = True) -> None:
        _check_meta_params(name, params, options)

    meta_loss, evaluate = metric_objectives(name, score, encoder=encoder, ways=resolve_ways,
                                            encoder_params=_encoder_params)
    meta_loss, evaluate = meta_loss.checked(meta_params_check), evaluate.checked(meta_params_check)
    return MetaLearner(name=name, init=init, adapt=adapt, meta_loss=meta_loss, evaluate=evaluate,
                       predict=predict, second_order=False, model=encoder)


def matching_net(encoder: ModelFn, *, ways: int | None = None, temperature: float = 1.0,
                 distance: Literal["cosine", "squared_euclidean"] = "cosine", learn_temperature: bool = False,
                 fce: bool = False, feature_dim: int | None = None, fce_steps: int = 2,
                 fce_seed: int = 0) -> MetaLearner:
    """Matching Networks (Vinyals et al., 2016): a query's class distribution is the softmax attention over the
    support set (a similarity divided by ``temperature``) applied to the support labels.

    ``encoder(params, x) -> (examples, features)`` is pure. ``meta_loss`` is the query negative log-likelihood of
    that distribution. ``distance="cosine"`` (the paper's) attends with cosine similarities, which lie in [0, 1] for
    ReLU features, so a small ``temperature`` (e.g. 0.1) is needed for a sharp attention; ``"squared_euclidean"``
    attends with ``-||f(x) - g(x_i)||^2`` (the distance with which Matching Networks were reproduced where the cosine
    failed). ``learn_temperature=True`` makes the temperature a meta-parameter: ``learner.init(params)`` adds its log,
    starting at ``log(temperature)``, under :data:`LOG_TEMPERATURE_KEY`, and the outer optimizer updates it.
    ``fce=True`` adds full context embeddings: the support set goes through a bidirectional LSTM
    (in the order given) and each query through an attention LSTM with ``fce_steps`` reads (dot-product attention,
    as in the paper, whatever ``distance``); their parameters
    (``feature_dim`` wide, drawn from ``fce_seed``) are added by ``learner.init(params)`` under ``"fce/"``.

    Example:
        >>> import torch
        >>> from metafunc import Task, apply_grads, functionalize, meta_value_and_grad
        >>> encoder, params = functionalize(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()))
        >>> learner = matching_net(encoder, fce=True, feature_dim=8)
        >>> meta_params = learner.init(params)
        >>> tasks = Task(torch.randn(2, 6, 4), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2),
        ...              torch.randn(2, 3, 4), torch.tensor([[0, 1, 2]] * 2))
        >>> loss, metrics, grads = meta_value_and_grad(learner)(meta_params, tasks)
        >>> apply_grads(meta_params, grads)  # then optimizer.step()
    """
    name = "matching_net"
    check_model(encoder, name)
    resolve_ways = WaysResolver(name, check_ways(name, ways))
    options = _Options(temperature=temperature, distance=distance, learn_temperature=learn_temperature, fce=fce,
                       feature_dim=feature_dim, fce_steps=fce_steps, fce_seed=fce_seed)
    _check_options(name, options)
    return _matching_learner(name, encoder, resolve_ways, options)
