"""metafunc: ``meta_value_and_grad`` (the fast default) and ``meta_batch`` + backward in each mode."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

import metafunc
from metafunc.step import default as fast

AVAILABLE, WHY = True, ""
AUTO_PROBES = 40
"""Calls the ``mode="auto"`` variants make when built, untimed, so the timed ones run the plan auto keeps (the
trainer probes the same way before a run: ``metafunc.train.loop.measured_plan``)."""

VARIANTS = ("default", "workers1", "channels_last", "workers1-channels_last", "together-channels_last", "compiled",
            "compiled-cudagraphs", "meta_batch-auto", "loop", "vmap", "vmap-chunk4")
"""``default``: ``meta_value_and_grad(learner.meta_loss)`` (mode="auto", called until it has chosen its plan:
``AUTO_PROBES``); ``workers1``: the same with ``workers=1``; ``channels_last``, ``workers1-channels_last``: the loop
fixed to ``channels_last=True`` (each task's images and convolution weights in channels-last format), two tasks at
a time and one; ``together-channels_last``: two at a time started together, as the loop ran before it spread
their starts over a task's duration (see ``metafunc.step.default._in_order``); ``compiled``: ``metafunc.compiled_meta_step`` (the vmapped meta-step traced and compiled by
inductor; the first call compiles); ``compiled-cudagraphs``: the same replayed as
a CUDA graph (CUDA only); the others: ``meta_batch(..., mode)`` followed by
``loss.backward()`` (``meta_batch-auto`` is the documented meta-step with the default mode)."""


def _runner(learner, module: nn.Module, tasks, variant: str) -> Callable[[], dict] | None:
    model, params = metafunc.functionalize(module)
    if variant == "compiled-cudagraphs" and tasks.support_x.device.type != "cuda":
        return None
    if variant in ("compiled", "compiled-cudagraphs"):
        run = metafunc.compiled_meta_step(learner(model).meta_loss, cuda_graphs=variant == "compiled-cudagraphs")

        def step() -> dict[str, Tensor]:
            return run(params, tasks)[2]
        return step
    if variant == "together-channels_last":
        return _together(fast.meta_value_and_grad(learner(model).meta_loss, mode="loop", workers=2,
                                                  channels_last=True), params, tasks)
    if variant in ("default", "workers1", "channels_last", "workers1-channels_last"):
        layout = {"mode": "loop", "channels_last": True} if variant.endswith("channels_last") else {}
        run = fast.meta_value_and_grad(learner(model).meta_loss, workers=1 if variant.startswith("workers1") else None,
                                       **layout)
        for _ in range(AUTO_PROBES if not layout else 0):  # mode="auto" measures its candidates on the first
            run(params, tasks)                              # calls: time the plan it keeps, as a run would
            if run.planner.plan() is not None:
                break

        def step() -> dict[str, Tensor]:
            return run(params, tasks)[2]
        step.plan = lambda: str(run.plan)  # type: ignore[attr-defined]
        return step
    mode, chunk = {"meta_batch-auto": ("auto", None), "loop": ("loop", None), "vmap": ("vmap", None),
                   "vmap-chunk4": ("vmap", 4)}[variant]
    batched = metafunc.meta_batch(learner(model).meta_loss, mode=mode, chunk_size=chunk)

    def step() -> dict[str, Tensor]:
        for p in params.values():
            p.grad = None
        loss, _ = batched(params, tasks)
        loss.backward()
        return {k: p.grad for k, p in params.items()}

    return step


class _NoSpacing(fast._Spacing):
    """A task duration of zero: the tasks in flight start together."""

    @property
    def seconds(self) -> float | None:
        return 0.0


def _together(run, params, tasks) -> Callable[[], dict]:
    def step() -> dict[str, Tensor]:
        spacing, fast._Spacing = fast._Spacing, _NoSpacing  # type: ignore[misc]
        try:
            return run(params, tasks)[2]
        finally:
            fast._Spacing = spacing  # type: ignore[misc]
    step.plan = lambda: str(run.plan) + ", started together"  # type: ignore[attr-defined]
    return step


def maml_step(module: nn.Module, tasks, *, inner_lr: float, steps: int, first_order: bool,
              variant: str = "default") -> Callable[[], dict] | None:
    return _runner(lambda m: metafunc.maml(m, inner_lr=inner_lr, steps=steps, first_order=first_order),
                   module, tasks, variant)


def protonet_step(module: nn.Module, tasks, variant: str = "default") -> Callable[[], dict] | None:
    return _runner(lambda m: metafunc.protonet(m), module, tasks, variant)
