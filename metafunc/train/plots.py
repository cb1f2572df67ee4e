"""Figures of a run: the learning curve (and the atomic figure save every plot uses)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

__all__ = ["plot_learning_curve", "save_figure"]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_learning_curve(records: Iterable[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Save the training loss (and accuracy) per iteration, smoothed, with the validation points, to ``path``.

    Example:
        >>> import tempfile, os
        >>> recs = [{"iteration": i, "split": "train", "loss": 1.0 / i} for i in range(1, 50)]
        >>> plot_learning_curve(recs, os.path.join(tempfile.mkdtemp(), "curve.png")).suffix
        '.png'
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    train_recs = [r for r in records if r.get("split") == "train"]
    val_recs = [r for r in records if r.get("split") == "val"]
    has_acc = any("accuracy" in r for r in train_recs)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False)
    its = [r["iteration"] for r in train_recs]
    window = max(1, len(its) // 50)
    ax = axes[0][0]
    losses = [r.get("loss", r.get("objective", math.nan)) for r in train_recs]
    ax.plot(its, losses, color="C0", alpha=0.25, lw=0.8)
    ax.plot(its, _smooth(losses, window), color="C0", label="train query loss (after the inner steps)")
    if val_recs and "mse" in val_recs[0]:
        ax.plot([r["iteration"] for r in val_recs], [r["mse"] for r in val_recs], "o-", color="C3",
                label=f"validation MSE ({val_recs[0]['inner_steps']} steps)")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    if has_acc:
        ax = axes[0][1]
        accs = [r.get("accuracy", math.nan) for r in train_recs]
        ax.plot(its, _smooth(accs, window), color="C0", label="train query accuracy")
        if val_recs and "accuracy" in val_recs[0]:
            ax.errorbar([r["iteration"] for r in val_recs], [r["accuracy"] for r in val_recs],
                        yerr=[r["accuracy_ci95"] for r in val_recs], fmt="o-", color="C3", capsize=3,
                        label=f"validation accuracy ({val_recs[0]['inner_steps']} steps)")
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel("accuracy")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure atomically (temp file, then ``os.replace``) and close it; returns ``path``.

    Example:
        >>> import tempfile, os
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> save_figure(plt.figure(), os.path.join(tempfile.mkdtemp(), "empty.png")).name
        'empty.png'
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
