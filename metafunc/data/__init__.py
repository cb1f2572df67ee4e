"""Few-shot data: a device-resident episode sampler for any labelled tensor data set, Omniglot, and the standard
few-shot image benchmarks (CIFAR-FS and FC100 from the CIFAR-100 release, miniImageNet, tieredImageNet).

Example:
    >>> import torch
    >>> from metafunc.data import EpisodeSampler
    >>> sampler = EpisodeSampler(torch.rand(60, 1, 8, 8), torch.arange(60) % 6, ways=3, shots=1, queries=2)
    >>> sampler.sample(2, torch.Generator().manual_seed(0)).query_x.shape
    torch.Size([2, 6, 1, 8, 8])
"""

from metafunc.data.augment import AugmentedSource, random_crop_flip
from metafunc.data.cifar import (
    CIFAR100_FILE,
    CIFAR100_MD5,
    CIFAR100_URL,
    CIFAR_FS_CLASSES,
    FC100_SUPERCLASSES,
    ImageSplit,
    cifar_fs_samplers,
    download_cifar100,
    fc100_samplers,
    load_cifar_fs,
    load_fc100,
)
from metafunc.data.episodes import EpisodeSampler, SplitSamplers
from metafunc.data.mini_imagenet import (
    MINI_IMAGENET_CLASSES,
    MINI_IMAGENET_PICKLES,
    TIERED_IMAGENET_CLASSES,
    load_mini_imagenet,
    load_tiered_imagenet,
    mini_imagenet_samplers,
    tiered_imagenet_samplers,
)
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
from metafunc.data.variable import VariableEpisodeSampler

__all__ = [
    "EpisodeSampler",
    "SplitSamplers",
    "VariableEpisodeSampler",
    "AugmentedSource",
    "random_crop_flip",
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
    "ImageSplit",
    "load_cifar_fs",
    "load_fc100",
    "cifar_fs_samplers",
    "fc100_samplers",
    "download_cifar100",
    "CIFAR100_URL",
    "CIFAR100_MD5",
    "CIFAR100_FILE",
    "CIFAR_FS_CLASSES",
    "FC100_SUPERCLASSES",
    "load_mini_imagenet",
    "mini_imagenet_samplers",
    "load_tiered_imagenet",
    "tiered_imagenet_samplers",
    "MINI_IMAGENET_CLASSES",
    "TIERED_IMAGENET_CLASSES",
    "MINI_IMAGENET_PICKLES",
]
