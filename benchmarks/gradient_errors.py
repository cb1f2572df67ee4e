"""The relative error of every learner's float64 meta-gradient against the plain ``torch.autograd`` loop.

The settings and the reference are those of ``tests/test_gradients.py`` (which asserts < 1e-10): Conv-4 with
BatchNorm (28x28, width 4), an MLP with LayerNorm and a plain MLP, 2 tasks, float64; for each algorithm the worst
of ``meta_batch`` in ``vmap`` and ``loop`` mode. Prints a markdown table with the largest error per model, rounded to
one significant digit as the README quotes it.

    python benchmarks/gradient_errors.py                  # 3 inner steps (the README's table)
    python benchmarks/gradient_errors.py --steps 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from reference import relative_error  # noqa: E402
from test_gradients import FACTORIES, SETTINGS, _case, _metafunc_gradient  # noqa: E402

__all__ = ["worst_errors", "main"]

MODELS = {"conv4-batchnorm": "Conv-4 with BatchNorm (28x28, width 4)", "mlp-layernorm": "MLP with LayerNorm",
          "mlp": "plain MLP"}


def worst_errors(model_name: str, steps: int) -> dict[str, float]:
    """For each algorithm, the larger relative error of the ``vmap`` and ``loop`` meta-gradients.

    Example:
        >>> errors = worst_errors("mlp", steps=1)      # doctest: +SKIP
        >>> max(errors.values()) < 1e-10               # doctest: +SKIP
        True
    """
    worst = {}
    for algorithm in FACTORIES:
        learner, params, tasks, reference = _case(algorithm, model_name, steps)
        worst[algorithm] = max(relative_error(_metafunc_gradient(learner, params, tasks, mode=mode), reference)
                               for mode in ("vmap", "loop"))
    return worst


def main(argv: list[str] | None = None) -> int:
    """Print the table.

    Example:
        >>> main(["--steps", "1"])  # doctest: +SKIP
        0
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="inner steps (default 3)")
    args = p.parse_args(argv)
    print(f"| model | {' | '.join(FACTORIES)} | worst | worst, 1 digit |")
    print("|---" * (len(FACTORIES) + 3) + "|")
    for name in SETTINGS:
        errors = worst_errors(name, args.steps)
        worst = max(errors.values())
        cells = " | ".join(f"{errors[a]:.1e}" for a in FACTORIES)
        print(f"| {MODELS.get(name, name)} | {cells} | {worst:.1e} | {worst:.0e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
