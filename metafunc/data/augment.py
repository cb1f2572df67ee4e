"""Data augmentation of few-shot episodes on the device: random crop (with padding) and horizontal flip.

Metric learners on the image benchmarks are usually trained with it (ProtoNet, MetaOptNet on CIFAR-FS, FC100 and
miniImageNet). Every image of the episode draws its own flip and offset from the episode's generator, in one
vectorised pass on the images' device, so the augmentation costs no host round trip.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metafunc._shared import check_steps
from metafunc.core.types import Task

__all__ = ["random_crop_flip", "AugmentedSource"]


def random_crop_flip(images: Tensor, generator: torch.Generator, *, padding: int) -> Tensor:
    """Each image of ``(..., C, H, W)`` flipped left-right with probability 1/2 and cropped back to ``H x W`` at a
    random offset from its zero-padded ``(H + 2 padding) x (W + 2 padding)`` version.

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> y = random_crop_flip(x, torch.Generator().manual_seed(0), padding=1)
        >>> y.shape, bool(torch.isin(y, torch.cat([x.flatten(), torch.zeros(1)])).all())
        (torch.Size([1, 1, 4, 4]), True)
    """
    check_steps("random_crop_flip", "padding", padding, minimum=0)
    lead, (c, h, w) = images.shape[:-3], images.shape[-3:]
    flat = images.reshape(-1, c, h, w)
    n, dev = flat.shape[0], images.device
    flip = torch.rand(n, generator=generator, device=generator.device).to(dev) < 0.5
    flat = torch.where(flip.view(n, 1, 1, 1), flat.flip(-1), flat)
    if padding:
        padded = torch.nn.functional.pad(flat, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=generator.device).to(dev)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=generator.device).to(dev)
        rows = (dy.view(n, 1) + torch.arange(h, device=dev)).view(n, 1, h, 1).expand(n, c, h, w + 2 * padding)
        flat = torch.gather(padded, 2, rows)
        cols = (dx.view(n, 1) + torch.arange(w, device=dev)).view(n, 1, 1, w).expand(n, c, h, w)
        flat = torch.gather(flat, 3, cols)
    return flat.reshape(*lead, c, h, w)


class AugmentedSource:
    """A task source whose episodes' support and query images are augmented with :func:`random_crop_flip`.

    Example:
        >>> from metafunc.data import EpisodeSampler
        >>> base = EpisodeSampler(torch.rand(60, 3, 8, 8), torch.arange(60) % 6, ways=3, shots=1, queries=2)
        >>> AugmentedSource(base, padding=1).sample(2, torch.Generator().manual_seed(0)).support_x.shape
        torch.Size([2, 3, 3, 8, 8])
    """

    def __init__(self, source: object, *, padding: int):
        if not callable(getattr(source, "sample", None)):
            raise TypeError(f"AugmentedSource: source must have .sample(num_tasks, generator) "
                            f"(got {type(source).__name__})")
        self.source, self.padding = source, check_steps("AugmentedSource", "padding", padding, minimum=0)

    def sample(self, num_tasks: int, generator: torch.Generator) -> Task:
        """``num_tasks`` episodes of the wrapped source, augmented with the same ``generator``."""
        tasks = self.source.sample(num_tasks, generator)  # type: ignore[attr-defined]
        return tasks._replace(support_x=random_crop_flip(tasks.support_x, generator, padding=self.padding),
                              query_x=random_crop_flip(tasks.query_x, generator, padding=self.padding))

    def __getattr__(self, name: str) -> object:  # ways, shots, queries, ... of the wrapped source
        return getattr(self.source, name)
