"""The whole meta-step as one compiled function: ``torch.compile``, and CUDA graphs on a GPU, checked against eager.

:func:`compiled_meta_step` writes the meta-step ``params, tasks -> (loss, metrics, grads)`` entirely with
``torch.func`` (``grad_and_value`` of the mean meta-loss of a ``vmap``-ed meta-batch, the inner loop inside it) and
hands that one function to :func:`torch.compile`: the inner steps, their double backward and the outer gradient are
all forward computation in one traced graph, which the compiler can fuse and, with ``cuda_graphs=True``, replay as
one CUDA graph (``mode="reduce-overhead"``: torch's CUDA-graph trees, with their static input buffers).

A compiler that changes the numbers must not go unnoticed. With ``check=True`` (the default) the first call for each
input signature (shapes, dtypes, devices) also runs the same step eagerly and raises if the two meta-gradients
differ by more than ``rtol`` (relative error of the whole gradient tree). ``tests/test_compiled.py`` checks the
compiled step against a plain ``torch.autograd`` loop in float64.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor
from torch.func import grad_and_value
from torch.fx.experimental.proxy_tensor import make_fx

from metafunc._shared import check_choice
from metafunc.core.batching import check_batching_options, checked_tasks, meta_batch
from metafunc.core.task_function import per_task_function
from metafunc.core.tree import tree_relative_error
from metafunc.core.types import Metrics, Params, PerTaskFn, Task

__all__ = ["compiled_meta_step", "DEFAULT_RTOL"]

DEFAULT_RTOL: dict[torch.dtype, float] = {torch.float64: 1e-9, torch.float32: 1e-4}
"""The largest relative error of the compiled meta-gradient against the eager one that ``check=True`` accepts,
by dtype: float32 leaves room for the compiler's reordering of sums, float64 almost none."""


def _signature(params: Params, tasks: Task) -> tuple:
    def of(t: Tensor) -> tuple:
        return tuple(t.shape), t.dtype, t.device, t.requires_grad
    return tuple((k, of(v)) for k, v in params.items()), tuple(of(t) for t in tasks)


def _check_compiler_options(*, backend: str, rtol: float | None, cuda_graphs: bool) -> None:
    """:func:`compiled_meta_step`'s eager checks on the compiler settings."""
    if not isinstance(backend, str) or not backend:
        raise TypeError(f"compiled_meta_step: backend must be a torch.compile backend name such as 'inductor' "
                        f"(got {backend!r})")
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"compiled_meta_step: unknown backend {backend!r}; choose one of "
                         f"{sorted(torch._dynamo.list_backends(exclude_tags=()))}")
    if rtol is not None and not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"compiled_meta_step: rtol must be a number > 0 (got {rtol!r})")
    if cuda_graphs and backend != "inductor":
        raise ValueError(f"compiled_meta_step: cuda_graphs=True needs backend='inductor' (got {backend!r})")


def _checked_step_inputs(per_task: PerTaskFn, params: Params, tasks: Task, *, mode: str, validate: bool,
                         cuda_graphs: bool) -> Task:
    """The compiled step's eager checks on one call's ``params`` and ``tasks``; the checked tasks."""
    if not isinstance(params, dict):
        raise TypeError(f"compiled_meta_step: params must be a dict of tensors (got {type(params).__name__})")
    tasks = checked_tasks("compiled_meta_step", per_task, params, tasks, mode=mode, validate=validate)
    if tasks.num_tasks < 1:
        raise ValueError("compiled_meta_step: the meta-batch is empty (0 tasks); stack at least one task")
    if cuda_graphs and tasks.support_x.device.type != "cuda":
        raise ValueError(f"compiled_meta_step: cuda_graphs=True needs CUDA tensors (got tasks on "
                         f"{tasks.support_x.device}); move params and tasks with .to('cuda') or drop cuda_graphs")
    return tasks


def _trained_and_frozen(params: Params) -> tuple[Params, Params]:
    """``params`` split, detached, into the meta-learned ones (those that require grad) and the rest."""
    trained = {k: v.detach() for k, v in params.items() if isinstance(v, Tensor) and v.requires_grad}
    if not trained:
        raise ValueError("compiled_meta_step: no parameter requires grad; pass leaves from "
                         "functionalize(module) (or call .requires_grad_() on the ones to meta-learn)")
    frozen = {k: v.detach() if isinstance(v, Tensor) else v for k, v in params.items() if k not in trained}
    return trained, frozen


def _check_against_eager(grads: Params, reference: Params, *, tolerance: float, backend: str) -> None:
    """Raise if the compiled meta-gradient ``grads`` differs from the eager ``reference`` by more than
    ``tolerance`` (relative error of the whole tree)."""
    error = tree_relative_error({k: g.detach() for k, g in grads.items()}, reference)
    if not error <= tolerance:
        raise RuntimeError(
            f"compiled_meta_step: the compiled meta-gradient differs from the eager one by {error:.2e} "
            f"(relative, whole tree) > rtol={tolerance:.0e} with backend={backend!r}; use "
            "metafunc.meta_value_and_grad (eager), another backend, or a larger rtol if this is expected"
        )


def compiled_meta_step(
    per_task: PerTaskFn | Callable[[Params, Task], Tensor] | Any,
    *,
    mode: Literal["vmap", "loop"] = "vmap",
    chunk_size: int | None = None,
    backend: str = "inductor",
    cuda_graphs: bool = False,
    check: bool = True,
    rtol: float | None = None,
    dynamic: bool | None = False,
    validate: bool = True,
) -> Callable[[Params, Task], tuple[Tensor, Metrics, Params]]:
    """Build ``step(params, tasks) -> (loss, metrics, grads)``, the meta-step compiled by :func:`torch.compile`.

    Same contract as :func:`metafunc.meta_value_and_grad`: ``grads`` is the gradient of the mean of ``per_task``
    over the meta-batch for every parameter that requires grad; ``loss`` and ``metrics`` are detached. The tasks run
    under ``vmap`` (``mode="vmap"``, in chunks of ``chunk_size``) or unrolled in the traced graph (``"loop"``, which
    compiles slower as the meta-batch grows). ``cuda_graphs=True`` compiles with ``mode="reduce-overhead"``, which
    replays the step as a CUDA graph (CUDA tensors only; it copies the inputs into static buffers, so keep shapes
    fixed; the results handed back are copies). ``check=True`` runs the step eagerly too on the first call of each
    input signature (the first three with ``cuda_graphs``: warm-up, recording and the first replay) and raises
    ``RuntimeError`` if the meta-gradients differ by more than ``rtol`` (default ``DEFAULT_RTOL`` for the dtype).
    The first call compiles (seconds to minutes); later calls with the same shapes reuse the compiled code.

    Example:
        >>> from metafunc import functionalize, maml, models, sinusoid_tasks
        >>> model, params = functionalize(models.mlp(hidden=(8,)))
        >>> learner = maml(model, inner_lr=0.01, steps=1, loss="mse")
        >>> step = compiled_meta_step(learner.meta_loss, backend="eager")  # "inductor" (the default) generates code
        >>> tasks = sinusoid_tasks(4, shots=5, generator=torch.Generator().manual_seed(0))
        >>> loss, metrics, grads = step(params, tasks)
        >>> sorted(grads) == sorted(params)
        True
    """
    per_task = per_task_function(per_task, "compiled_meta_step")
    check_choice("compiled_meta_step", "mode", mode, ("vmap", "loop"))
    check_batching_options("compiled_meta_step", mode, chunk_size)
    _check_compiler_options(backend=backend, rtol=rtol, cuda_graphs=cuda_graphs)

    batched = meta_batch(per_task, mode=mode, chunk_size=chunk_size, validate=False)

    def loss_of(trained: Params, frozen: Params, tasks: Task) -> tuple[Tensor, Metrics]:
        return batched({**frozen, **trained}, tasks)

    eager = grad_and_value(loss_of, has_aux=True)
    compiled_by_signature: dict[tuple, Callable] = {}
    # CUDA-graph trees run a new graph eagerly once (warm-up), record it on the next call and replay it from the
    # third: check all three, so the replayed graph is compared with eager too.
    checks_per_signature = 3 if cuda_graphs else 1
    checks_done: dict[tuple, int] = {}

    def compiled_for(key: tuple, trained: Params, frozen: Params, tasks: Task) -> Callable:
        # Dynamo cannot trace through nested torch.func transforms (grad of vmap of grad), so make_fx first runs
        # them once and records the aten ops they dispatch to: a flat graph of the whole meta-step (inner steps,
        # double backward, outer gradient), which torch.compile then compiles like any forward function.
        if key not in compiled_by_signature:
            graph = make_fx(eager)(trained, frozen, tasks)
            compiled_by_signature[key] = torch.compile(graph, backend=backend, dynamic=dynamic,
                                                       mode="reduce-overhead" if cuda_graphs else None)
        return compiled_by_signature[key]

    def step(params: Params, tasks: Task) -> tuple[Tensor, Metrics, Params]:
        tasks = _checked_step_inputs(per_task, params, tasks, mode=mode, validate=validate, cuda_graphs=cuda_graphs)
        trained, frozen = _trained_and_frozen(params)
        key = _signature(params, tasks)
        run = compiled_for(key, trained, frozen, tasks)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        grads, (loss, metrics) = run(trained, frozen, tasks)
        if cuda_graphs:  # a replay overwrites its static outputs: hand out copies that stay valid
            grads, loss = {k: g.clone() for k, g in grads.items()}, loss.clone()
            metrics = {k: v.clone() for k, v in metrics.items()}
        if check and checks_done.get(key, 0) < checks_per_signature:
            reference, _ = eager(trained, frozen, tasks)
            tolerance = rtol if rtol is not None else DEFAULT_RTOL.get(next(iter(trained.values())).dtype, 1e-2)
            _check_against_eager(grads, reference, tolerance=tolerance, backend=backend)
            checks_done[key] = checks_done.get(key, 0) + 1
        return loss.detach(), {k: v.detach() for k, v in metrics.items()}, {k: g.detach() for k, g in grads.items()}

    return step
