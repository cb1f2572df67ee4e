"""Few-shot evaluation over many episodes: mean and 95% confidence interval (1.96 * std / sqrt(n)).

BatchNorm protocol: metafunc's BatchNorm normalises with the statistics of the batch it is given, so each task's
support set is normalised with its own statistics while adapting, and its query set with the query statistics when
scored (transductive, the MAML reference protocol). :data:`BATCHNORM_PROTOCOL` is the sentence printed with results.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from torch.func import vmap

from metafunc._shared import check_choice, check_steps
from metafunc.algorithms import MetaLearner, with_steps
from metafunc.core.batching import Mode, meta_batch
from metafunc.core.types import Params, Task

__all__ = [
    "new_output_layer",
    "HEAD_PREFIX","EvalResult", "TaskSource", "BATCHNORM_PROTOCOL", "confidence_interval", "task_scores",
           "evaluate_episodes"]

BATCHNORM_PROTOCOL = "transductive: BatchNorm uses each task's batch statistics"


class TaskSource(Protocol):
    """Anything with ``sample(meta_batch, generator) -> Task`` (a meta-batch with a leading task dimension).

    Example:
        >>> from metafunc import Task, functionalize, maml
        >>> class Doubling:  # tasks y = 2x; any class with this sample method is a TaskSource
        ...     def sample(self, meta_batch: int, generator: torch.Generator) -> Task:
        ...         x = torch.randn(meta_batch, 5, 1, generator=generator)
        ...         return Task(x, 2 * x, x, 2 * x)
        >>> source: TaskSource = Doubling()
        >>> source.sample(3, torch.Generator().manual_seed(0)).support_x.shape
        torch.Size([3, 5, 1])
        >>> model, _ = functionalize(torch.nn.Linear(1, 1, bias=False))
        >>> evaluate_episodes(maml(model, inner_lr=0.01, loss="mse"), {"weight": torch.tensor([[2.0]])}, source,
        ...                   episodes=8, steps=0, classification=False, generator=torch.Generator().manual_seed(0)).mean
        0.0
    """

    def sample(self, meta_batch: int, generator: torch.Generator) -> Task: ...


class EvalResult(NamedTuple):
    """Per-episode scores summarised: ``metric`` is ``"accuracy"`` or ``"mse"``; ``ci95 = 1.96 * std / sqrt(n)``.

    Example:
        >>> mean, ci95, std = confidence_interval(torch.tensor([1.0, 0.0, 1.0, 1.0]))  # 4 episodes' accuracies
        >>> result = EvalResult("accuracy", mean, ci95, std, episodes=4, steps=1)
        >>> result.format()
        'accuracy 75.00% +- 49.00% (95% CI, 4 episodes, 1 inner steps)'
        >>> result.as_dict()["std"]
        0.5
    """

    metric: str
    mean: float
    ci95: float
    std: float
    episodes: int
    steps: int | None
    """Inner steps of adaptation; ``None`` for a learner without an inner loop (ProtoNet, Matching Nets)."""

    def format(self) -> str:
        """``"accuracy 97.10% +- 0.45% (95% CI, 600 episodes, 3 inner steps)"`` style text (no inner steps for a
        learner without an inner loop)."""
        if self.metric == "accuracy":
            value = f"{100 * self.mean:.2f}% +- {100 * self.ci95:.2f}%"
        else:
            value = f"{self.mean:.4f} +- {self.ci95:.4f}"
        steps = "" if self.steps is None else f", {self.steps} inner steps"
        return f"{self.metric} {value} (95% CI, {self.episodes} episodes{steps})"

    def as_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields."""
        return dict(self._asdict())


def confidence_interval(values: Tensor) -> tuple[float, float, float]:
    """``(mean, 1.96 * std / sqrt(n), std)`` of per-episode scores (``std`` with Bessel's correction; 0 for n=1).

    Example:
        >>> confidence_interval(torch.tensor([1.0, 0.0, 1.0, 0.0]))[0]
        0.5
    """
    if not isinstance(values, Tensor):
        raise TypeError(f"confidence_interval: values must be a tensor (got {type(values).__name__})")
    values = values.detach().reshape(-1).to(torch.float64)
    n = values.numel()
    if n == 0:
        raise ValueError("confidence_interval: values is empty; evaluate at least one episode")
    std = float(values.std()) if n > 1 else 0.0
    return float(values.mean()), 1.96 * std / math.sqrt(n), std


def task_scores(learner: MetaLearner, params: Params, tasks: Task, *, steps: int, classification: bool,
                mode: Mode = "vmap") -> Tensor:
    """One score per task after ``steps`` inner steps (0 = no adaptation): query accuracy or query MSE.

    Example:
        >>> from metafunc import functionalize, maml, models, sinusoid_tasks
        >>> model, params = functionalize(models.mlp())
        >>> tasks = sinusoid_tasks(4, shots=5, generator=torch.Generator().manual_seed(0))
        >>> task_scores(maml(model, inner_lr=0.01, loss="mse"), params, tasks, steps=1, classification=False).shape
        torch.Size([4])
    """
    check_steps("task_scores", "steps", steps, minimum=0)
    check_choice("task_scores", "mode", mode, ("auto", "vmap", "loop"))
    params = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        if steps == 0:
            def score(t_x: Tensor, t_y: Tensor) -> Tensor:
                prediction = learner.predict(params, t_x)
                if classification:
                    return (prediction.argmax(-1) == t_y).to(prediction.dtype).mean()
                return ((prediction - t_y) ** 2).mean()

            if mode == "vmap":
                return vmap(score)(tasks.query_x, tasks.query_y)
            return torch.stack([score(x, y) for x, y in zip(tasks.query_x, tasks.query_y)])
        losses, metrics = meta_batch(with_steps(learner.evaluate, steps), mode=mode, reduce="none")(params, tasks)
        if classification:
            return metrics["accuracy"]
        return losses


def evaluate_episodes(learner: MetaLearner, params: Params, source: TaskSource, *, episodes: int = 600,
                      steps: int = 1, classification: bool, generator: torch.Generator, batch: int = 25,
                      mode: Mode = "vmap", progress: bool = False) -> EvalResult:
    """Score ``episodes`` tasks from ``source`` (drawn ``batch`` at a time with ``generator``) after ``steps``
    inner steps; returns the mean and the 95% confidence interval. ``progress=True`` shows a tqdm bar with the
    running mean.

    Example:
        >>> from metafunc import functionalize, maml, models
        >>> from metafunc.train import SinusoidSource
        >>> model, params = functionalize(models.mlp())
        >>> result = evaluate_episodes(maml(model, inner_lr=0.01, loss="mse"), params, SinusoidSource(shots=5),
        ...                            episodes=10, steps=1, classification=False,
        ...                            generator=torch.Generator().manual_seed(0))
        >>> result.episodes
        10
    """
    check_steps("evaluate_episodes", "episodes", episodes)
    check_steps("evaluate_episodes", "batch", batch)
    check_steps("evaluate_episodes", "steps", steps, minimum=0)
    if not hasattr(source, "sample"):
        raise TypeError(f"evaluate_episodes: source needs a sample(meta_batch, generator) method (got "
                        f"{type(source).__name__})")
    scores = []
    done = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=episodes, desc="evaluate", unit="episode", dynamic_ncols=True)
    while done < episodes:
        n = min(batch, episodes - done)
        scores.append(task_scores(learner, params, source.sample(n, generator), steps=steps,
                                  classification=classification, mode=mode))
        done += n
        if bar is not None:
            bar.set_postfix({"accuracy" if classification else "mse": f"{float(torch.cat(scores).mean()):.4f}"},
                            refresh=False)
            bar.update(n)
    if bar is not None:
        bar.close()
    mean, ci, std = confidence_interval(torch.cat(scores))
    return EvalResult("accuracy" if classification else "mse", mean, ci, std, episodes, steps)


HEAD_PREFIX = "head"
"""metafunc's models name their output layer ``head`` (and Meta-SGD keeps its learning rates as ``inner_lr/head...``)."""


def new_output_layer(saved: Params, fresh: Params, *, head: str = HEAD_PREFIX) -> tuple[Params, list[str]]:
    """Meta-parameters for a model with another number of ways: ``saved`` everywhere the shapes agree, a
    zero-initialised output layer where they do not (``fresh`` gives the new shapes), and for Meta-SGD's learning
    rates of that layer the mean of the trained ones. Returns ``(params, replaced names)``; any other mismatch is a
    ``ValueError``.

    A zero output layer predicts uniform probabilities; the inner loop adapts it to each task's support set (the
    20-way evaluation of 5-way MAML-family checkpoints in ``metafunc evaluate --ways 20``).

    Example:
        >>> saved = {"body.w": torch.ones(3, 2), "head.weight": torch.ones(5, 3), "head.bias": torch.ones(5)}
        >>> fresh = {"body.w": torch.zeros(3, 2), "head.weight": torch.randn(20, 3), "head.bias": torch.randn(20)}
        >>> params, replaced = new_output_layer(saved, fresh)
        >>> replaced, float(params["head.weight"].abs().sum()), params["body.w"].sum().item()
        (['head.weight', 'head.bias'], 0.0, 6.0)
    """
    out: Params = {}
    replaced: list[str] = []
    for name, new in fresh.items():
        if name not in saved:
            raise ValueError(f"new_output_layer: the checkpoint has no parameter {name!r}; it is from another model")
        old = saved[name]
        if tuple(old.shape) == tuple(new.shape):
            out[name] = old
            continue
        layer = name.split("/", 1)[1] if "/" in name else name
        if not (layer == head or layer.startswith(head + ".")):
            raise ValueError(f"new_output_layer: {name!r} has shape {tuple(old.shape)} in the checkpoint and "
                             f"{tuple(new.shape)} in the model, and it is not part of the output layer {head!r}")
        out[name] = torch.full_like(new, float(old.mean())) if "/" in name else torch.zeros_like(new)
        replaced.append(name)
    return out, replaced
