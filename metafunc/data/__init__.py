"""Few-shot data: a device-resident episode sampler for any labelled tensor data set, and Omniglot.

Example:
    >>> import torch
    >>> from metafunc.data import EpisodeSampler
    >>> sampler = EpisodeSampler(torch.rand(60, 1, 8, 8), torch.arange(60) % 6, ways=3, shots=1, queries=2)
    >>> sampler.sample(2, torch.Generator().manual_seed(0)).query_x.shape
    torch.Size([2, 6, 1, 8, 8])
"""

from metafunc.data.episodes import EpisodeSampler
from metafunc.data.omniglot import (
    DEFAULT_TEST_ALPHABETS,
    OMNIGLOT_MD5,
    OMNIGLOT_URL,
    OMNIGLOT_VARIANTS,
    VINYALS_TRAIN_CHARACTERS,
    Omniglot,
    download_omniglot,
    load_omniglot,
    omniglot_samplers,
    omniglot_splits,
)

__all__ = [
    "EpisodeSampler",
    "Omniglot",
    "load_omniglot",
    "omniglot_splits",
    "omniglot_samplers",
    "download_omniglot",
    "OMNIGLOT_MD5",
    "OMNIGLOT_VARIANTS",
    "OMNIGLOT_URL",
    "DEFAULT_TEST_ALPHABETS",
    "VINYALS_TRAIN_CHARACTERS",
]
