"""Variable-way, variable-shot episodes in the Meta-Dataset style, drawn as padded meta-batches.

Each task draws its number of ways uniformly in ``[min_ways, max_ways]``, then for each class a number of support
examples uniformly in ``[min_shots, max_shots]`` and exactly ``queries`` query examples; if the support set would
hold more than ``max_support`` examples, the largest shots are lowered one at a time (never below ``min_shots``)
until it fits. The tasks of a meta-batch are stacked with :func:`metafunc.pad_tasks` (see
:mod:`metafunc.core.padding` for the convention), so ``protonet``, ``proto_maml``, ``fo_proto_maml`` and the MAML
family batch them under ``vmap``, each task scored as if it were alone.

Example:
    >>> import torch
    >>> sampler = VariableEpisodeSampler(torch.randn(200, 4), torch.arange(200) % 20, min_ways=2, max_ways=5,
    ...                                  min_shots=1, max_shots=4, queries=2)
    >>> tasks = sampler.sample(3, torch.Generator().manual_seed(0))
    >>> tasks.num_tasks, tasks.support_x.shape[-1]
    (3, 4)
"""

from __future__ import annotations

import torch
from torch import Tensor

from metafunc._shared import check_steps
from metafunc.core.padding import pad_tasks
from metafunc.core.types import Task

__all__ = ["VariableEpisodeSampler", "check_episode_ranges"]

_NAME = "VariableEpisodeSampler"


def check_episode_ranges(caller: str, *, min_ways: int, max_ways: int, min_shots: int, max_shots: int,
                         queries: int, max_support: int | None) -> int:
    """The eager checks on a variable episode's shape; returns the support cap (``max_ways * max_shots`` if None).

    Example:
        >>> check_episode_ranges("mine", min_ways=3, max_ways=5, min_shots=1, max_shots=4, queries=2, max_support=None)
        20
        >>> check_episode_ranges("mine", min_ways=5, max_ways=3, min_shots=1, max_shots=4, queries=2, max_support=None)
        Traceback (most recent call last):
        ...
        ValueError: mine: max_ways must be >= min_ways (got max_ways=3, min_ways=5)
    """
    for name, low, high in (("ways", min_ways, max_ways), ("shots", min_shots, max_shots)):
        check_steps(caller, f"min_{name}", low, minimum=2 if name == "ways" else 1)
        check_steps(caller, f"max_{name}", high, minimum=1)
        if high < low:
            raise ValueError(f"{caller}: max_{name} must be >= min_{name} (got max_{name}={high}, min_{name}={low})")
    check_steps(caller, "queries", queries, minimum=1)
    if max_support is None:
        return max_ways * max_shots
    check_steps(caller, "max_support", max_support, minimum=1)
    if max_support < max_ways * min_shots:
        raise ValueError(f"{caller}: max_support={max_support} cannot hold max_ways * min_shots = {max_ways} * "
                         f"{min_shots} = {max_ways * min_shots} support examples; raise max_support or lower "
                         "max_ways or min_shots")
    return max_support


def _cap(shots: list[int], cap: int, minimum: int) -> list[int]:
    """Lower the largest shots one at a time (not below ``minimum``) until they sum to at most ``cap``."""
    shots = list(shots)
    while sum(shots) > cap:
        k = max(range(len(shots)), key=lambda i: (shots[i], -i))
        if shots[k] <= minimum:
            break
        shots[k] -= 1
    return shots


class VariableEpisodeSampler:
    """Draw padded meta-batches of tasks with varying ways and shots (see :mod:`metafunc.data.variable`).

    ``examples`` is any tensor whose first dimension indexes examples (encoded texts, images, features) and
    ``labels`` a 1-D integer tensor of class ids (any values). Every class needs ``max_shots + queries`` examples.
    Picked classes are labelled ``0..ways-1`` in random order; examples of each set are shuffled. Random numbers come
    from the ``torch.Generator`` passed to :meth:`sample` (on the CPU), so the same state gives the same episodes.
    Floating examples are cast to ``dtype``; integer examples (token ids) keep their dtype.

    Example:
        >>> sampler = VariableEpisodeSampler(torch.randn(60, 3), torch.arange(60) % 6, min_ways=2, max_ways=4,
        ...                                  min_shots=1, max_shots=3, queries=2, max_support=8)
        >>> [int(t.support_y.max()) + 1 for t in sampler.sample_tasks(4, torch.Generator().manual_seed(1))]
        [3, 4, 2, 3]
    """

    def __init__(self, examples: Tensor, labels: Tensor, *, min_ways: int, max_ways: int, min_shots: int = 1,
                 max_shots: int, queries: int, max_support: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(examples, Tensor) or not isinstance(labels, Tensor):
            raise TypeError(f"{_NAME}: examples and labels must be tensors (got {type(examples).__name__} and "
                            f"{type(labels).__name__})")
        if labels.dim() != 1 or labels.is_floating_point() or labels.shape[0] != examples.shape[0]:
            raise ValueError(f"{_NAME}: labels must be a 1-D integer tensor with one label per example (got dtype "
                             f"{labels.dtype}, shape {tuple(labels.shape)} for {examples.shape[0]} examples)")
        self.max_support = check_episode_ranges(_NAME, min_ways=min_ways, max_ways=max_ways, min_shots=min_shots,
                                                max_shots=max_shots, queries=queries, max_support=max_support)
        self.min_ways, self.max_ways, self.min_shots, self.max_shots = min_ways, max_ways, min_shots, max_shots
        self.queries, self.dtype = queries, dtype
        class_ids, inverse, counts = torch.unique(labels.cpu(), return_inverse=True, return_counts=True)
        if class_ids.numel() < max_ways:
            raise ValueError(f"{_NAME}: max_ways={max_ways} but the data set has only {class_ids.numel()} classes; "
                             f"use max_ways <= {class_ids.numel()}")
        if int(counts.min()) < max_shots + queries:
            raise ValueError(f"{_NAME}: max_shots + queries = {max_shots} + {queries} but some classes have only "
                             f"{int(counts.min())} examples; lower max_shots or queries, or drop the small classes")
        self.examples = examples.detach()
        self._members = [torch.nonzero(inverse == c).flatten() for c in range(class_ids.numel())]

    def __repr__(self) -> str:
        return (f"{_NAME}(classes={len(self._members)}, ways={self.min_ways}..{self.max_ways}, "
                f"shots={self.min_shots}..{self.max_shots}, queries={self.queries}, max_support={self.max_support})")

    def _task(self, g: torch.Generator) -> Task:
        ways = int(torch.randint(self.min_ways, self.max_ways + 1, (1,), generator=g))
        classes = torch.randperm(len(self._members), generator=g)[:ways].tolist()
        shots = _cap(torch.randint(self.min_shots, self.max_shots + 1, (ways,), generator=g).tolist(),
                     self.max_support, self.min_shots)
        sets: list[list[Tensor]] = [[], [], [], []]
        for label, (c, s) in enumerate(zip(classes, shots)):
            members = self._members[c]
            picked = members[torch.randperm(members.numel(), generator=g)[:s + self.queries]]
            for i, idx in enumerate((picked[:s], picked[s:])):
                sets[2 * i].append(idx)
                sets[2 * i + 1].append(torch.full((idx.numel(),), label, dtype=torch.int64))
        parts = []
        for i in (0, 2):
            idx, y = torch.cat(sets[i]), torch.cat(sets[i + 1])
            order = torch.randperm(y.numel(), generator=g)
            x = self.examples[idx[order]]
            parts += [x.to(self.dtype) if x.is_floating_point() else x, y[order]]
        return Task(*parts)

    def sample_tasks(self, meta_batch: int, generator: torch.Generator) -> list[Task]:
        """``meta_batch`` unpadded tasks (what :meth:`sample` pads), for a per-task loop or a reference.

        Example:
            >>> sampler = VariableEpisodeSampler(torch.randn(40, 2), torch.arange(40) % 4, min_ways=2, max_ways=3,
            ...                                  max_shots=2, queries=1)
            >>> len(sampler.sample_tasks(5, torch.Generator().manual_seed(0)))
            5
        """
        check_steps(f"{_NAME}.sample", "meta_batch", meta_batch)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{_NAME}.sample: generator must be a torch.Generator, e.g. "
                            f"torch.Generator().manual_seed(0) (got {type(generator).__name__})")
        return [self._task(generator) for _ in range(meta_batch)]

    def sample(self, meta_batch: int, generator: torch.Generator) -> Task:
        """A padded meta-batch (:func:`metafunc.pad_tasks`) of ``meta_batch`` tasks.

        Example:
            >>> sampler = VariableEpisodeSampler(torch.randn(40, 2), torch.arange(40) % 4, min_ways=2, max_ways=3,
            ...                                  max_shots=2, queries=1)
            >>> sampler.sample(5, torch.Generator().manual_seed(0)).num_tasks
            5
        """
        return pad_tasks(self.sample_tasks(meta_batch, generator))
