"""Padded meta-batches: episodes with different numbers of ways and shots batched under ``vmap``.

The convention, in one place. A *padded meta-batch* is an ordinary :class:`metafunc.Task` whose tasks were padded
to the largest support and query counts of the meta-batch (support and query separately). A padding example
carries the label :data:`PAD_LABEL` (``-1``) and comes after every real example of its set; its input is a copy of
a real example of its task, so it is finite for any encoder. A task's number of ways is its largest support label
plus one, with labels ``0..ways-1``; the outputs of a classifier beyond that are absent classes. Losses and
accuracies are means over the real examples only, with the logits of absent classes masked by a very negative
finite value (:func:`mask_logits`), so each task's loss equals that of the same task alone, unpadded. Layers that
normalise with batch statistics see the padding, so a padded meta-batch on such a model is refused
(:func:`check_padded_model`).

Example:
    >>> import torch
    >>> a = Task(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 3), torch.tensor([1, 0]))
    >>> b = Task(torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2]), torch.randn(3, 3), torch.tensor([2, 0, 1]))
    >>> tasks = pad_tasks([a, b])
    >>> tasks.support_y
    tensor([[ 0,  1, -1, -1, -1, -1],
            [ 0,  0,  1,  1,  2,  2]])
    >>> task_ways(tasks.support_y)
    tensor([2, 3])
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metafunc.core.types import Task, check_labels
from metafunc.nn.norm import BatchNorm

__all__ = ["PAD_LABEL", "pad_tasks", "padding_mask", "valid_mask", "is_padded", "task_ways", "class_mask",
           "mask_logits", "masked_cross_entropy", "way_masked_cross_entropy", "masked_accuracy", "check_padding", "check_padded_labels",
           "batch_statistics_layers", "check_padded_model"]

PAD_LABEL = -1
"""The label of a padding example in a padded meta-batch (see :mod:`metafunc.core.padding`)."""


def padding_mask(y: Tensor) -> Tensor:
    """``True`` for padding examples: the trailing run of :data:`PAD_LABEL` labels along the last dimension.

    A ``-1`` followed by a real label is not padding (it is a bad label, which the learners' checks report).

    Example:
        >>> padding_mask(torch.tensor([[0, 1, -1, -1], [0, -1, 1, -1]]))
        tensor([[False, False,  True,  True],
                [False, False, False,  True]])
    """
    real = y != PAD_LABEL
    # an example is padding if it and every later example carry PAD_LABEL
    later_real = real.flip(-1).to(torch.int64).cumsum(-1).flip(-1) > 0
    return ~later_real


def valid_mask(y: Tensor) -> Tensor:
    """``True`` for the real examples of a padded set (``y >= 0``); under ``vmap`` too.

    Example:
        >>> valid_mask(torch.tensor([2, 0, -1]))
        tensor([ True,  True, False])
    """
    return y >= 0


def is_padded(task: Task) -> bool:
    """Whether ``task`` (one task or a meta-batch) holds padding examples; eager (reads the labels).

    Example:
        >>> is_padded(Task(torch.zeros(2, 1), torch.tensor([0, -1]), torch.zeros(1, 1), torch.tensor([0])))
        True
    """
    return any(not y.is_floating_point() and y.numel() and bool(padding_mask(y).any())
               for y in (task.support_y, task.query_y))


def task_ways(support_y: Tensor) -> Tensor:
    """A task's number of ways, its largest support label plus one, as a tensor (per task for a meta-batch).

    Example:
        >>> task_ways(torch.tensor([[0, 1, 1, -1], [2, 0, 1, 3]]))
        tensor([2, 4])
    """
    return support_y.amax(-1) + 1


def class_mask(ways: Tensor | int, num_classes: int, *, device: torch.device | None = None) -> Tensor:
    """``(num_classes,)`` booleans, ``True`` for the classes ``0..ways-1`` of a task (``ways`` may be batched).

    Example:
        >>> class_mask(torch.tensor(2), 4)
        tensor([ True,  True, False, False])
    """
    if isinstance(ways, Tensor):
        device = ways.device
        ways = ways.unsqueeze(-1)
    return torch.arange(num_classes, device=device) < ways


def mask_logits(logits: Tensor, ways: Tensor | int) -> Tensor:
    """``logits (examples, classes)`` with the classes ``>= ways`` set to the dtype's most negative finite value.

    Their softmax probability is then exactly 0 and no gradient of any order reaches them; with every class
    present the logits are returned unchanged, bit for bit.

    Example:
        >>> mask_logits(torch.tensor([[1.0, 2.0, 3.0]]), 2)
        tensor([[ 1.0000e+00,  2.0000e+00, -3.4028e+38]])
    """
    keep = class_mask(ways, logits.shape[-1], device=logits.device)
    return torch.where(keep, logits, torch.finfo(logits.dtype).min)


def masked_cross_entropy(logits: Tensor, y: Tensor, ways: Tensor | int | None = None) -> Tensor:
    """Cross-entropy averaged over the real examples (labels ``>= 0``); with ``ways``, the logits of the classes
    ``>= ways`` are masked first (:func:`mask_logits`). Without padding and with ``ways=None`` it is
    ``F.cross_entropy(logits, y)``, bit for bit.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, 5.0], [0.0, 1.0, 5.0], [9.0, 9.0, 9.0]])
        >>> float(masked_cross_entropy(logits, torch.tensor([0, 1, -1]), ways=2))
        ... # doctest: +ELLIPSIS
        0.2200...
    """
    if ways is not None:
        logits = mask_logits(logits, ways)
    return F.cross_entropy(logits, y, ignore_index=PAD_LABEL)


def way_masked_cross_entropy(prediction: Tensor, target: Tensor) -> Tensor:
    """A classification loss for model-based learners (``maml(model, loss=way_masked_cross_entropy)``): each task
    is scored among its own classes only, the outputs beyond its ways masked (its ways read from the support labels
    in the inner loop and for the query loss), over its real examples.

    With the default ``loss="cross_entropy"`` a padded task is scored among all the model's outputs (padding
    examples ignored), the same as the task alone; this loss instead makes a fixed head of ``max_ways`` outputs
    serve tasks of fewer ways. Called alone, it reads the ways from ``target``.

    Example:
        >>> float(way_masked_cross_entropy(torch.tensor([[0.0, 0.0, 7.0]]), torch.tensor([1])))
        0.6931471824645996
    """
    return masked_cross_entropy(prediction, target, ways=task_ways(target))


def masked_accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """The fraction of real examples (labels ``>= 0``) whose largest logit is their label, in ``logits``' dtype.

    Example:
        >>> masked_accuracy(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 0, -1]))
        tensor(0.5000)
    """
    valid = valid_mask(y)
    correct = (logits.detach().argmax(-1) == y) & valid
    return correct.to(logits.dtype).sum(-1) / valid.to(logits.dtype).sum(-1)


def _check_set(caller: str, index: int, side: str, x: object, y: object) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{caller}: task {index}: {side}_x and {side}_y must be tensors (got {type(x).__name__} and "
                        f"{type(y).__name__})")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{caller}: task {index}: {side}_y must be a 1-D tensor of integer class labels (got dtype "
                        f"{y.dtype}, shape {tuple(y.shape)}); pass unbatched tasks, one per list item")
    if x.dim() < 1 or x.shape[0] != y.shape[0] or y.numel() == 0:
        raise ValueError(f"{caller}: task {index}: {side}_x and {side}_y need the same number (>= 1) of examples "
                         f"(got shapes {tuple(x.shape)} and {tuple(y.shape)})")
    if int(y.min()) < 0:
        raise ValueError(f"{caller}: task {index}: {side}_y has negative labels (min {int(y.min())}); pass unpadded "
                         "tasks labelled 0..ways-1")
    return x, y


def _pad(x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``x`` padded with copies of its first example and ``y`` with :data:`PAD_LABEL`, to ``n`` examples."""
    extra = n - y.shape[0]
    return (torch.cat([x, x[:1].expand(extra, *x.shape[1:])]),
            torch.cat([y, y.new_full((extra,), PAD_LABEL)]))


def pad_tasks(tasks: Sequence[Task]) -> Task:
    """Stack unbatched tasks of any ways and shots into one padded meta-batch (the convention of this module).

    Support and query sets are padded separately to the largest count among ``tasks``: padding examples get the
    label :data:`PAD_LABEL` and a copy of their task's first example as input, after the real examples.

    Example:
        >>> a = Task(torch.zeros(2, 4), torch.tensor([0, 1]), torch.zeros(2, 4), torch.tensor([0, 1]))
        >>> b = Task(torch.ones(3, 4), torch.tensor([0, 1, 2]), torch.ones(6, 4), torch.tensor([0, 1, 2] * 2))
        >>> padded = pad_tasks([a, b])
        >>> padded.support_x.shape, padded.query_y[0]
        (torch.Size([2, 3, 4]), tensor([ 0,  1, -1, -1, -1, -1]))
    """
    caller = "pad_tasks"
    if isinstance(tasks, (Task, Tensor)) or not isinstance(tasks, Sequence) or not tasks:
        raise TypeError(f"{caller}: tasks must be a non-empty list of unbatched metafunc.Task (got "
                        f"{type(tasks).__name__}{' of length 0' if isinstance(tasks, Sequence) else ''})")
    sets: list[list[tuple[Tensor, Tensor]]] = [[], []]
    for i, task in enumerate(tasks):
        if not isinstance(task, tuple) or len(task) != 4:
            raise TypeError(f"{caller}: task {i} must be a metafunc.Task (got {type(task).__name__})")
        sets[0].append(_check_set(caller, i, "support", task[0], task[1]))
        sets[1].append(_check_set(caller, i, "query", task[2], task[3]))
    first = sets[0][0][0]
    for i, (x, _), (xq, _) in zip(range(len(tasks)), *sets):
        for side, t in (("support_x", x), ("query_x", xq)):
            if t.shape[1:] != first.shape[1:] or t.dtype != first.dtype or t.device != first.device:
                raise ValueError(f"{caller}: task {i}: {side} has examples of shape {tuple(t.shape[1:])}, {t.dtype} "
                                 f"on {t.device}, but task 0's support_x has {tuple(first.shape[1:])}, {first.dtype} "
                                 f"on {first.device}; every task needs the same example shape, dtype and device")
    parts: list[Tensor] = []
    for examples in sets:
        n = max(y.shape[0] for _, y in examples)
        padded = [_pad(x, y, n) for x, y in examples]
        parts += [torch.stack([x for x, _ in padded]), torch.stack([y for _, y in padded])]
    return Task(*parts)


def check_padding(caller: str, support_y: Tensor, query_y: Tensor) -> None:
    """Eager checks of the labels ``(tasks, examples)`` of a possibly padded meta-batch: no label below
    :data:`PAD_LABEL`, padding only after a task's real examples, and at least one real example per set.

    Example:
        >>> check_padding("protonet", torch.tensor([[0, 1, -1]]), torch.tensor([[-1, 1, 0]]))
        Traceback (most recent call last):
        ...
        ValueError: protonet: task.query_y has negative labels (min -1); relabel each task 0..ways-1 (-1 marks a padding example only after the real examples of its set, as metafunc.pad_tasks builds them)
    """
    for name, y in (("support_y", support_y), ("query_y", query_y)):
        stray = (y < 0) & ~padding_mask(y)
        if bool(stray.any()):
            raise ValueError(f"{caller}: task.{name} has negative labels (min {int(y[stray].min())}); relabel each "
                             "task 0..ways-1 (-1 marks a padding example only after the real examples of its set, "
                             "as metafunc.pad_tasks builds them)")
        empty = ~valid_mask(y).any(-1)
        if bool(empty.any()):
            raise ValueError(f"{caller}: task {int(empty.nonzero()[0])} has only padding in task.{name}; every task "
                             "needs at least one real example in its support and query sets")


def check_padded_labels(caller: str, tasks: Task, num_classes: int) -> None:
    """:func:`metafunc.core.types.check_labels` for a possibly padded meta-batch: padding examples are skipped
    (every set needs a real example); a ``-1`` before a real label is reported as a label out of range.

    Example:
        >>> y = torch.tensor([[0, 2, -1]])
        >>> check_padded_labels("maml", Task(torch.zeros(1, 3, 2), y, torch.zeros(1, 3, 2), y), 3)
    """
    labels = {}
    for name in ("support_y", "query_y"):
        y = getattr(tasks, name)
        if not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool) and y.dim() >= 1 and y.numel():
            pad = padding_mask(y)
            if bool(pad.all(-1).any()):
                raise ValueError(f"{caller}: a task has only padding in task.{name}; every task needs at least one "
                                 "real example in its support and query sets")
            y = torch.where(pad, torch.zeros_like(y), y)
        labels[name] = y
    check_labels(caller, tasks._replace(**labels), num_classes)


def batch_statistics_layers(model: object) -> list[str]:
    """Names of the layers of ``model`` (a :func:`metafunc.functionalize` model) that normalise with the batch's
    statistics: torch BatchNorm in training mode or without running statistics, and :class:`metafunc.BatchNorm`
    without ``use_running_stats``. Their output for one example depends on the other examples, padding included.

    Example:
        >>> from metafunc import functionalize
        >>> model, _ = functionalize(nn.Sequential(nn.Linear(2, 4), BatchNorm(4)))
        >>> batch_statistics_layers(model)
        ['1 (BatchNorm)']
    """
    module = getattr(model, "module", None)
    if not isinstance(module, nn.Module):
        return []
    found = []
    for name, m in module.named_modules():
        torch_batch = isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
        if torch_batch or (isinstance(m, BatchNorm) and not m.use_running_stats):
            found.append(f"{name or '<root>'} ({type(m).__name__})")
    return found


def check_padded_model(caller: str, model: object, tasks: Task) -> None:
    """Refuse a padded meta-batch on a model with batch statistics (:func:`batch_statistics_layers`): the padding
    would change every task's statistics, so the tasks would not be the same tasks unpadded.

    Example:
        >>> from metafunc import functionalize
        >>> model, _ = functionalize(nn.Sequential(nn.Linear(2, 4), BatchNorm(4)))
        >>> y = torch.tensor([[0, 1, -1]])
        >>> check_padded_model("maml", model, Task(torch.zeros(1, 3, 2), y, torch.zeros(1, 3, 2), y))
        Traceback (most recent call last):
        ...
        ValueError: maml: the meta-batch is padded (labels -1) but the model normalises with batch statistics in ['1 (BatchNorm)'], which the padding examples would change; use a per-example norm (metafunc.LayerNorm, GroupNorm), BatchNorm with fixed statistics (use_running_stats=True), or meta-batches without padding (equal ways and shots)
    """
    if not is_padded(tasks):
        return
    layers = batch_statistics_layers(model)
    if layers:
        raise ValueError(f"{caller}: the meta-batch is padded (labels -1) but the model normalises with batch "
                         f"statistics in {layers}, which the padding examples would change; use a per-example norm "
                         "(metafunc.LayerNorm, GroupNorm), BatchNorm with fixed statistics (use_running_stats=True), "
                         "or meta-batches without padding (equal ways and shots)")
