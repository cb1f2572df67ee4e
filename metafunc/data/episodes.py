"""N-way K-shot episodes drawn from a labelled tensor data set that lives, whole, on one device.

The data set is stored once as a tensor on the chosen device (``uint8`` stays ``uint8``: 4840 Omniglot images of
28x28 take 3.8 MB); a meta-batch is drawn with a handful of tensor ops (random keys + ``argsort`` to pick classes and
examples without replacement, one gather), with no Python loop over images, classes or tasks.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from metafunc._shared import check_steps
from metafunc.core.types import Task

__all__ = ["EpisodeSampler", "SplitSamplers", "check_class_sizes"]

_NAME = "EpisodeSampler"


def _check_count(caller: str, name: str, value: Any, minimum: int) -> int:
    return check_steps(caller, name, value, minimum=minimum)


def check_class_sizes(labels: Tensor, *, shots: int, queries: int) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.unique(labels, return_inverse=True, return_counts=True)`` (on the CPU), after checking that every
    class has at least ``shots + queries`` examples: the check :class:`EpisodeSampler` makes, without building one.

    Example:
        >>> ids, inverse, counts = check_class_sizes(torch.tensor([3, 3, 5, 5, 5]), shots=1, queries=1)
        >>> ids.tolist(), counts.tolist()
        ([3, 5], [2, 3])
        >>> check_class_sizes(torch.tensor([3, 3, 5, 5, 5]), shots=2, queries=1)
        Traceback (most recent call last):
        ValueError: EpisodeSampler: shots + queries = 2 + 1 = 3 but some classes have only 2 examples (e.g. ...
    """
    if labels.numel() == 0:
        raise ValueError(f"{_NAME}: the data set is empty (no labels); pass a split with at least one class")
    class_ids, inverse, counts = torch.unique(labels.cpu(), return_inverse=True, return_counts=True)
    per_task = shots + queries
    smallest = int(counts.min())
    if smallest < per_task:
        bad = class_ids[counts < per_task][:5].tolist()
        raise ValueError(
            f"{_NAME}: shots + queries = {shots} + {queries} = {per_task} but some classes have only "
            f"{smallest} examples (e.g. class ids {bad}); lower shots or queries to at most {smallest}, or drop "
            "the small classes"
        )
    return class_ids, inverse, counts


def _check_images_and_labels(images: Any, labels: Any, dtype: Any) -> None:
    """:class:`EpisodeSampler`'s eager checks on the data set and the output dtype."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{_NAME}: images must be a tensor (got {type(images).__name__})")
    if not isinstance(labels, Tensor):
        raise TypeError(f"{_NAME}: labels must be a tensor (got {type(labels).__name__})")
    if images.dim() < 1 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{_NAME}: labels must be 1-D with one label per image (got images of shape {tuple(images.shape)} "
            f"and labels of shape {tuple(labels.shape)})"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{_NAME}: labels must hold integer class ids (got dtype {labels.dtype})")
    if images.shape[0] == 0:
        raise ValueError(f"{_NAME}: the data set is empty (images of shape {tuple(images.shape)})")
    if images.is_complex() or images.dtype == torch.bool:
        raise TypeError(f"{_NAME}: images must be uint8 images, floating point, or integer token ids "
                        f"(got dtype {images.dtype})")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{_NAME}: dtype must be a floating torch.dtype (got {dtype!r})")


def _check_rotations(rotations: Any, images: Tensor) -> None:
    if not isinstance(rotations, bool):
        raise TypeError(f"{_NAME}: rotations must be a bool (got {rotations!r})")
    if rotations and (images.dim() < 3 or images.shape[-1] != images.shape[-2]):
        raise ValueError(
            f"{_NAME}: rotations=True needs square images (..., H, W) with H == W "
            f"(got images of shape {tuple(images.shape)}); pass rotations=False"
        )


def _class_index(inverse: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """``(index, valid)``, both ``(classes, largest class size)``: ``index[c, j]`` is the position in the data set of
    the j-th example of class ``c`` (padded with 0 where a class has fewer examples), ``valid`` marks the real ones.
    ``inverse`` and ``counts`` are those of ``torch.unique(labels, return_inverse=True, return_counts=True)``."""
    order = torch.argsort(inverse, stable=True)
    max_n = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(max_n).expand(counts.numel(), max_n)
    valid = slot < counts[:, None]
    index = torch.where(valid, order[(starts[:, None] + slot).clamp(max=inverse.numel() - 1)], 0)
    return index, valid


def _stored_images(images: Tensor, device: torch.device, rotations: bool) -> Tensor:
    """``images`` detached on ``device``; with ``rotations`` all four rotations are stored once (4x memory), so that a
    rotated draw is one gather: row ``4 * i + k`` is example ``i`` rotated by ``k * 90`` degrees."""
    example_shape = tuple(images.shape[1:])
    images = images.detach().to(device)
    if rotations:
        images = torch.stack([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)], dim=1)
        images = images.reshape(-1, *example_shape)
    return images


class EpisodeSampler:
    """Draw meta-batches of ``ways``-way ``shots``-shot tasks (with ``queries`` query examples per class).

    ``images`` is any tensor whose first dimension indexes examples and ``labels`` a 1-D integer tensor of class ids
    (any values; they are renumbered). Both are copied once to ``device``. ``uint8`` images are returned as floats
    in ``[0, 1]`` (divided by 255); floating images are returned as they are (cast to ``dtype``); other integer
    examples (token ids, as :func:`metafunc.hf.tokenize` makes them) are returned as they are, integers.

    Each task picks ``ways`` distinct classes uniformly, then ``shots + queries`` distinct examples of each class;
    the i-th picked class gets label ``i``, so the class-to-label map is a fresh random permutation per task, and the
    examples of the support and of the query set are put in a random order. With ``rotations=True`` (the MAML
    Omniglot protocol) every class also appears rotated by 90, 180 and 270 degrees as three extra classes
    (``4 * num_classes`` in all); images must then be square in their last two dimensions.

    ``sample(meta_batch, generator)`` returns a :class:`metafunc.Task` with ``support_x`` of shape
    ``(meta_batch, ways * shots, *example_shape)``, ``support_y`` of shape ``(meta_batch, ways * shots)`` (int64,
    values ``0..ways-1``), and the query set likewise with ``ways * queries`` examples. The random numbers come from
    ``generator`` (on its own device), so the same generator state gives the same episodes.

    Example:
        >>> images, labels = torch.rand(100, 1, 8, 8), torch.arange(100) % 10
        >>> sampler = EpisodeSampler(images, labels, ways=5, shots=1, queries=3)
        >>> task = sampler.sample(4, torch.Generator().manual_seed(0))
        >>> task.support_x.shape, task.query_y.shape
        (torch.Size([4, 5, 1, 8, 8]), torch.Size([4, 15]))
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        ways: int,
        shots: int,
        queries: int,
        rotations: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        _check_images_and_labels(images, labels, dtype)
        self.ways = _check_count(_NAME, "ways", ways, 1)
        self.shots = _check_count(_NAME, "shots", shots, 1)
        self.queries = _check_count(_NAME, "queries", queries, 1)
        _check_rotations(rotations, images)
        self.rotations = rotations
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else images.device

        class_ids, inverse, counts = check_class_sizes(labels, shots=self.shots, queries=self.queries)
        num_base = int(class_ids.numel())
        self.num_classes = num_base * (4 if rotations else 1)
        if self.ways > self.num_classes:
            raise ValueError(
                f"{_NAME}: ways = {self.ways} but the data set has only {self.num_classes} classes"
                f"{' (with rotations)' if rotations else ''}; use ways <= {self.num_classes}"
            )
        self.class_ids = class_ids
        index, valid = _class_index(inverse, counts)
        self._index = index.to(self.device)
        self._valid = valid.to(self.device)
        self._uniform = bool(valid.all())
        self._max_n = int(counts.max())
        self.example_shape = tuple(images.shape[1:])
        self.images = _stored_images(images, self.device, rotations)
        # rows as flat contiguous bytes: index_select copies whole rows (much faster than advanced indexing)
        self._rows = self.images.reshape(self.images.shape[0], -1).contiguous()

    def __repr__(self) -> str:
        return (f"EpisodeSampler(examples={self.images.shape[0]}, classes={self.num_classes}, ways={self.ways}, "
                f"shots={self.shots}, queries={self.queries}, rotations={self.rotations}, device={self.device})")

    def sample(self, meta_batch: int, generator: torch.Generator) -> Task:
        """A meta-batch of ``meta_batch`` tasks as a :class:`metafunc.Task` on the sampler's device.

        Example:
            >>> sampler = EpisodeSampler(torch.rand(40, 4), torch.arange(40) % 8, ways=3, shots=2, queries=2)
            >>> sampler.sample(2, torch.Generator().manual_seed(1)).support_y.shape
            torch.Size([2, 6])
        """
        check_steps("EpisodeSampler.sample", "meta_batch", meta_batch)
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                "EpisodeSampler.sample: generator must be a torch.Generator, e.g. torch.Generator().manual_seed(0) "
                f"(got {type(generator).__name__})"
            )
        b, w, s, q = meta_batch, self.ways, self.shots, self.queries
        gdev = generator.device

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=gdev).to(self.device)

        # ways distinct classes per task, in random order: the order is the label assignment.
        classes = torch.topk(rand(b, self.num_classes), w, dim=1, sorted=True).indices
        base = classes // 4 if self.rotations else classes
        # shots + queries distinct examples per picked class.
        keys = rand(b, w, self._max_n)
        if not self._uniform:
            keys = keys.masked_fill(~self._valid[base], 2.0)
        slots = torch.topk(keys, s + q, dim=2, largest=False, sorted=True).indices
        picked = torch.gather(self._index[base], 2, slots)  # (b, w, s + q) positions in the data set
        # random example order inside the support and query sets
        support_perm = torch.argsort(rand(b, w * s), dim=1)
        query_perm = torch.argsort(rand(b, w * q), dim=1)
        label = torch.arange(w, device=self.device).expand(b, w)
        parts = []
        for cut, n, perm in ((slice(0, s), s, support_perm), (slice(s, s + q), q, query_perm)):
            pos = torch.gather(picked[..., cut].reshape(b, w * n), 1, perm)
            y = torch.gather(label[..., None].expand(b, w, n).reshape(b, w * n), 1, perm)
            if self.rotations:
                rot = torch.gather((classes % 4)[..., None].expand(b, w, n).reshape(b, w * n), 1, perm)
                pos = pos * 4 + rot
            x = torch.index_select(self._rows, 0, pos.reshape(-1)).view(b, w * n, *self.example_shape)
            if self.images.dtype == torch.uint8:
                x = x.to(self.dtype).mul_(1 / 255)
            elif self.images.is_floating_point():
                x = x.to(self.dtype)
            parts += [x, y.to(torch.int64)]
        return Task(*parts)


class SplitSamplers(Mapping[str, EpisodeSampler]):
    """A read-only mapping ``split -> EpisodeSampler`` whose samplers are built on first use, then kept.

    ``build[split]()`` makes the sampler of ``split`` (and raises if ``ways[split]`` does not fit it); it runs the
    first time ``samplers[split]`` is read, once, so a split never read is never built, never copied to the device,
    and never checked against its ``ways``. ``ways`` and ``num_classes`` (per split, known before any build; rotated
    copies count as classes) let a caller check a split, or show its ways, without building it; ``built`` names
    the splits built so far. ``split in samplers`` and ``list(samplers)`` build nothing; ``.values()`` and
    ``.items()`` build every split. Building is thread-safe.

    Example:
        >>> images, labels = torch.rand(60, 4), torch.arange(60) % 6
        >>> samplers = SplitSamplers(
        ...     {"train": lambda: EpisodeSampler(images, labels, ways=5, shots=1, queries=2),
        ...      "val": lambda: EpisodeSampler(images, labels, ways=9, shots=1, queries=2)},
        ...     ways={"train": 5, "val": 9}, num_classes={"train": 6, "val": 6})
        >>> samplers["train"].ways, samplers.built, "val" in samplers
        (5, ('train',), True)
        >>> samplers["val"]
        Traceback (most recent call last):
        ValueError: EpisodeSampler: ways = 9 but the data set has only 6 classes; use ways <= 6
    """

    def __init__(self, build: Mapping[str, Callable[[], EpisodeSampler]], *, ways: Mapping[str, int],
                 num_classes: Mapping[str, int]) -> None:
        if set(ways) != set(build) or set(num_classes) != set(build):
            raise ValueError(f"SplitSamplers: build, ways and num_classes must name the same splits (got "
                             f"{sorted(build)}, {sorted(ways)} and {sorted(num_classes)})")
        self._build = dict(build)
        self.ways: dict[str, int] = {name: ways[name] for name in self._build}
        self.num_classes: dict[str, int] = {name: num_classes[name] for name in self._build}
        self._made: dict[str, EpisodeSampler] = {}
        self._lock = threading.Lock()

    def __getitem__(self, split: str) -> EpisodeSampler:
        if split not in self._build:
            raise KeyError(split)
        with self._lock:
            if split not in self._made:
                self._made[split] = self._build[split]()
            return self._made[split]

    def __contains__(self, split: object) -> bool:
        return split in self._build

    def __iter__(self) -> Iterator[str]:
        return iter(self._build)

    def __len__(self) -> int:
        return len(self._build)

    @property
    def built(self) -> tuple[str, ...]:
        """The splits built so far, in split order."""
        return tuple(name for name in self._build if name in self._made)

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}: {self.ways[name]}-way of {self.num_classes[name]} classes"
                          f"{'' if name in self._made else ' (not built)'}" for name in self._build)
        return f"SplitSamplers({parts})"
