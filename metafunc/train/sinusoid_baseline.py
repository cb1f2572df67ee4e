"""The main job's comparison: MAML on sinusoids against a baseline pretrained on all tasks jointly (the MAML
paper's comparison), and the paper's adaptation figure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch

from metafunc._shared import atomic_write_text, strict_json
from metafunc.algorithms import maml
from metafunc.core.functional import functionalize
from metafunc.core.types import ModelFn, Params, Task
from metafunc.data.sinusoid import SinusoidSource, SinusoidTasks, sinusoid_tasks
from metafunc.nn import models
from metafunc.step import MetaStep
from metafunc.train.callbacks import ProgressBar
from metafunc.train.config import TrainConfig, resolve_config
from metafunc.train.evaluation import EvalResult, evaluate_episodes
from metafunc.train.fit import FitState, fit
from metafunc.train.loop import TrainResult
from metafunc.train.plots import save_figure

__all__ = ["SINUSOID_EVAL_STEPS", "SinusoidComparison", "pretrain_baseline", "joint_regression_step", "sinusoid_comparison",
           "plot_sinusoid_adaptation", "compare_with_baseline"]

SINUSOID_EVAL_STEPS = (0, 1, 10)


class SinusoidComparison(NamedTuple):
    """Query MSE (600 held-out tasks, 100 query points each) after 0, 1 and 10 fine-tuning steps, per method.

    :func:`sinusoid_comparison` builds it; here it is filled by hand.

    Example:
        >>> def row(*means):
        ...     return {s: EvalResult("mse", m, 0.1, 1.0, 600, s) for s, m in zip((0, 1, 10), means)}
        >>> cmp = SinusoidComparison({"maml": row(3.2, 0.6, 0.4), "pretrained": row(3.0, 2.9, 2.5)}, {}, 10, 600)
        >>> print(cmp.table())
        Sinusoid regression, K=10: query MSE on 600 held-out tasks (mean +- 95% CI), after k fine-tuning steps ...
        method                   0 steps              1 step            10 steps
        ------------------------------------------------------------------------
        maml              3.200 +- 0.100      0.600 +- 0.100      0.400 +- 0.100
        pretrained        3.000 +- 0.100      2.900 +- 0.100      2.500 +- 0.100
        >>> cmp.as_dict()["results"]["maml"]["1"]["mean"]
        0.6
    """

    results: dict[str, dict[int, EvalResult]]
    baseline_params: Params
    shots: int
    episodes: int

    def table(self) -> str:
        """The comparison as a text table (mean +- 95% CI)."""
        steps = sorted(next(iter(self.results.values())))
        head = f"{'method':<12}" + "".join(f"{f'{s} step' + ('s' if s != 1 else ''):>20}" for s in steps)
        lines = [f"Sinusoid regression, K={self.shots}: query MSE on {self.episodes} held-out tasks "
                 "(mean +- 95% CI), after k fine-tuning steps on the K support points", head, "-" * len(head)]
        for name, row in self.results.items():
            lines.append(f"{name:<12}" + "".join(f"{f'{row[s].mean:.3f} +- {row[s].ci95:.3f}':>20}" for s in steps))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able results."""
        return {"shots": self.shots, "episodes": self.episodes,
                "results": {m: {str(s): r.as_dict() for s, r in row.items()} for m, row in self.results.items()}}


def pretrain_baseline(config: TrainConfig, *, progress: bool = True) -> Params:
    """The MAML paper's baseline: the same network (same initial weights) trained to regress sampled sinusoids
    jointly, without adaptation: MSE on all points of ``meta_batch`` tasks per step, Adam(``outer_lr``), for
    ``iterations`` steps (as many gradient steps as meta-training).

    Example:
        >>> params = pretrain_baseline(TrainConfig(iterations=3), progress=False)
        >>> sorted(params)[0]
        'body.0.bias'
    """
    cfg = resolve_config(config)
    if cfg.dataset != "sinusoid":
        raise ValueError(f"pretrain_baseline: the joint-training baseline is for --dataset sinusoid (got {cfg.dataset!r})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = models.mlp().to(cfg.device)
    model, params = functionalize(module)
    state = FitState(params=params, optimizer=torch.optim.Adam(params.values(), lr=cfg.outer_lr),
                     generator=torch.Generator(device=cfg.device).manual_seed(cfg.seed + 7), iterations=cfg.iterations)
    callbacks = [ProgressBar(total=cfg.iterations, initial=0, desc="pretrained baseline", metric="mse")] if progress else []
    fit(joint_regression_step(model), SinusoidSource(cfg.shots, cfg.queries), state, meta_batch=cfg.meta_batch,
        callbacks=callbacks)
    return {k: v.detach() for k, v in params.items()}


def joint_regression_step(model: ModelFn) -> MetaStep:
    """The baseline's step in the meta-step contract: MSE on every support and query point of the meta-batch at
    once, no adaptation (``(loss, {}, grads)``), so that :func:`metafunc.train.fit` trains it like any learner.

    Example:
        >>> from metafunc import functionalize, models, sinusoid_tasks
        >>> model, params = functionalize(models.mlp())
        >>> tasks = sinusoid_tasks(2, shots=5, generator=torch.Generator().manual_seed(0))
        >>> loss, metrics, grads = joint_regression_step(model)(params, tasks)
        >>> sorted(grads) == sorted(params), metrics
        (True, {})
    """
    def step(params: Params, tasks: Task) -> tuple[torch.Tensor, dict[str, torch.Tensor], Params]:
        x = torch.cat([tasks.support_x, tasks.query_x], 1).reshape(-1, 1)
        y = torch.cat([tasks.support_y, tasks.query_y], 1).reshape(-1, 1)
        loss = torch.nn.functional.mse_loss(model(params, x), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        return loss.detach(), {}, dict(zip(params, grads))
    return step


def sinusoid_comparison(result: TrainResult, baseline_params: Params, *, episodes: int = 600,
                        steps: tuple[int, ...] = SINUSOID_EVAL_STEPS) -> SinusoidComparison:
    """Evaluate the meta-learned initialisation and the pretrained baseline on the same held-out tasks (K support
    points, 100 query points) after each number of fine-tuning ``steps`` (SGD at ``inner_lr`` for the baseline; the
    learner's own inner loop for the meta-learner).

    Example:
        >>> import tempfile
        >>> from metafunc.train import train
        >>> res = train(TrainConfig(iterations=2, val_every=0, out=tempfile.mkdtemp()), progress=False)
        >>> cmp = sinusoid_comparison(res, pretrain_baseline(res.config, progress=False), episodes=4, steps=(0, 1))
        >>> sorted(cmp.results)
        ['maml', 'pretrained']
    """
    cfg, exp = result.config, result.experiment
    finetune = maml(exp.model, inner_lr=cfg.inner_lr, steps=1, loss="mse")
    source = SinusoidSource(cfg.shots, 100)
    results: dict[str, dict[int, EvalResult]] = {}
    for name, learner, params in ((cfg.algorithm, exp.learner, result.params),
                                  ("pretrained", finetune, baseline_params)):
        row = {}
        for s in steps:
            gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 2_000_003)  # same tasks for all rows
            row[s] = evaluate_episodes(learner, params, source, episodes=episodes, steps=s, classification=False,
                                       generator=gen, batch=100, mode=cfg.mode)
        results[name] = row
    return SinusoidComparison(results, baseline_params, cfg.shots, episodes)


def plot_sinusoid_adaptation(result: TrainResult, baseline_params: Params, path: str | os.PathLike, *,
                             tasks: int = 3, steps: tuple[int, ...] = (0, 1, 10)) -> Path:
    """The MAML paper's figure: for a few held-out tasks, the prediction before adaptation and after 1 and 10
    steps, the ground truth and the K support points; top row the meta-learner, bottom row the pretrained baseline.

    Example:
        >>> import tempfile, os
        >>> from metafunc.train import train
        >>> res = train(TrainConfig(iterations=2, val_every=0, out=tempfile.mkdtemp()), progress=False)
        >>> plot_sinusoid_adaptation(res, res.params, os.path.join(res.out, "fig.png"), tasks=1).name
        'fig.png'
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, exp = result.config, result.experiment
    finetune = maml(exp.model, inner_lr=cfg.inner_lr, steps=1, loss="mse")
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 3_000_017)
    drawn = cast(SinusoidTasks, sinusoid_tasks(tasks, shots=cfg.shots, generator=gen, return_parameters=True))
    grid = torch.linspace(-5, 5, 200, device=cfg.device).unsqueeze(-1)
    fig, axes = plt.subplots(2, tasks, figsize=(4.2 * tasks, 6.5), squeeze=False)
    rows = ((cfg.algorithm.upper(), exp.learner, result.params), ("pretrained", finetune, baseline_params))
    for r, (name, learner, params) in enumerate(rows):
        params = {k: v.detach() for k, v in params.items()}
        for c in range(tasks):
            ax = axes[r][c]
            t = drawn.task.task_at(c)
            truth = drawn.amplitude[c] * torch.sin(grid - drawn.phase[c])
            ax.plot(grid.cpu(), truth.cpu(), color="C3", lw=2, label="ground truth")
            for s, style in zip(steps, (":", "--", "-", "-.")):
                adapted = params if s == 0 else learner.adapt(params, t.support_x, t.support_y, steps=s)[0]
                with torch.no_grad():
                    pred = learner.predict(adapted, grid)
                label = "pre-update" if s == 0 else f"{s} grad step{'s' if s != 1 else ''}"
                ax.plot(grid.cpu(), pred.cpu(), style, color="C0" if s else "C2", alpha=0.55 + 0.045 * s, label=label)
            ax.plot(t.support_x.cpu(), t.support_y.cpu(), "^", color="purple", ms=7, label=f"{cfg.shots} support points")
            ax.set_title(f"{name}, task {c + 1}")
            ax.set_ylim(-6, 6)
            if c == 0:
                ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return save_figure(fig, path)


def compare_with_baseline(result: TrainResult, *, episodes: int = 600, progress: bool = True
                          ) -> tuple[SinusoidComparison, Path, Path]:
    """The main job's comparison: pretrain the baseline on the run's settings, compare on ``episodes`` held-out
    tasks, and write ``sinusoid_results.json`` and the paper's figure into the run's folder; returns the comparison
    and the two paths.

    Example:
        >>> import tempfile
        >>> from metafunc.train import TrainConfig, train
        >>> run = train(TrainConfig(iterations=2, out=tempfile.mkdtemp()), progress=False)
        >>> comparison, results, figure = compare_with_baseline(run, episodes=10, progress=False)
        >>> sorted(comparison.results), results.name, figure.name
        (['maml', 'pretrained'], 'sinusoid_results.json', 'sinusoid_adaptation.png')
    """
    baseline = pretrain_baseline(result.config, progress=progress)
    comparison = sinusoid_comparison(result, baseline, episodes=episodes)
    results = atomic_write_text(result.out / "sinusoid_results.json", strict_json(comparison.as_dict(), indent=2) + "\n")
    figure = plot_sinusoid_adaptation(result, baseline, result.out / "sinusoid_adaptation.png")
    return comparison, results, figure
