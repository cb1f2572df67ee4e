"""CLINC150 (Larson et al., 2019) for few-shot intent classification: meta-train on some domains, test on others."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor

from metafunc.data import EpisodeSampler, VariableEpisodeSampler
from metafunc.data.variable import check_episode_ranges

__all__ = ["Clinc150", "load_clinc150", "clinc_domain_split", "clinc_samplers", "clinc_variable_samplers",
           "DEFAULT_TEST_DOMAINS", "SPLITS"]

DEFAULT_TEST_DOMAINS = ("work", "small_talk", "meta")
"""The 3 held-out domains (the last three of ``domains.json``); the other 7 are meta-trained on."""

SPLITS = ("train", "val", "test")


class Clinc150(NamedTuple):
    """In-scope utterances of one CLINC150 split: ``texts[i]`` has intent ``intents[labels[i]]``.

    ``domains`` maps each of the 10 domains to its 15 intents.

    Example:
        >>> data = load_clinc150(split="val")  # doctest: +SKIP
        >>> data.intents[int(data.labels[0])] in data.domains["banking"] + data.domains["meta"]  # doctest: +SKIP
        True
    """

    texts: tuple[str, ...]
    labels: Tensor
    intents: tuple[str, ...]
    domains: dict[str, tuple[str, ...]]


def _root(root: str | os.PathLike | None, caller: str) -> Path:
    if root is None:
        env = os.environ.get("METAFUNC_DATA")
        if not env:
            raise ValueError(f"{caller}: pass root= (the folder holding data_full.json and domains.json) or set "
                             "METAFUNC_DATA to the shared data folder")
        root = Path(env) / "clinc150"
    path = Path(root).expanduser()
    if path.is_dir() and not (path / "data_full.json").exists() and (path / "clinc150").is_dir():
        path = path / "clinc150"
    for name in ("data_full.json", "domains.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{caller}: {str(path / name)!r} not found; root must be the clinc150 folder "
                                    "(holding data_full.json and domains.json)")
    return path


def load_clinc150(root: str | os.PathLike | None = None, *, split: str = "train") -> Clinc150:
    """The in-scope utterances of ``split`` (``"train"``: 100 per intent, ``"val"``: 20, ``"test"``: 30).

    ``root`` is the ``clinc150`` folder (default: ``$METAFUNC_DATA/clinc150``). Intents are numbered in the order
    of ``domains.json`` (domain by domain), so intent ``15 d + j`` is the j-th intent of domain ``d``.

    Example:
        >>> data = load_clinc150(split="test")  # doctest: +SKIP
        >>> len(data.intents), len(data.texts)  # doctest: +SKIP
        (150, 4500)
    """
    if split not in SPLITS:
        raise ValueError(f"load_clinc150: split must be one of {SPLITS} (got {split!r})")
    path = _root(root, "load_clinc150")
    with open(path / "domains.json") as f:
        domains = {d: tuple(v) for d, v in json.load(f).items()}
    with open(path / "data_full.json") as f:
        items = json.load(f)[split]
    intents = tuple(i for d in domains.values() for i in d)
    index = {name: i for i, name in enumerate(intents)}
    unknown = sorted({intent for _, intent in items if intent not in index})
    if unknown:
        raise ValueError(f"load_clinc150: intents {unknown[:3]} of split {split!r} are in no domain of domains.json")
    return Clinc150(tuple(t for t, _ in items), torch.tensor([index[i] for _, i in items]), intents, domains)


def clinc_domain_split(data: Clinc150, test_domains: Sequence[str] = DEFAULT_TEST_DOMAINS
                       ) -> tuple[list[int], list[int]]:
    """Intent ids of the meta-training domains and of the held-out ``test_domains``.

    Example:
        >>> train, test = clinc_domain_split(load_clinc150())  # doctest: +SKIP
        >>> len(train), len(test)  # doctest: +SKIP
        (105, 45)
    """
    bad = [d for d in test_domains if d not in data.domains]
    if bad or not test_domains:
        raise ValueError(f"clinc_domain_split: test_domains must name domains of {sorted(data.domains)} "
                         f"(got {list(test_domains)})")
    if len(set(test_domains)) == len(data.domains):
        raise ValueError("clinc_domain_split: hold out fewer than all domains; nothing is left to meta-train on")
    index = {name: i for i, name in enumerate(data.intents)}
    test = sorted(index[i] for d in test_domains for i in data.domains[d])
    train = sorted(set(range(len(data.intents))) - set(test))
    return train, test


def clinc_samplers(
    encode: Callable[[Sequence[str]], Tensor],
    root: str | os.PathLike | None = None,
    *,
    ways: int = 5,
    shots: int = 1,
    queries: int = 5,
    test_domains: Sequence[str] = DEFAULT_TEST_DOMAINS,
    dtype: torch.dtype = torch.float32,
) -> dict[str, EpisodeSampler]:
    """Episode samplers ``{"train", "val", "test"}`` over CLINC150 with disjoint domains.

    ``train`` draws from the train split of the meta-training domains' intents, ``val`` from their val split, and
    ``test`` from the test split (30 utterances per intent) of the held-out ``test_domains``. ``encode(texts) ->
    tensor (n, ...)`` turns utterances into examples: tokens from :func:`metafunc.text.tokenize`, or frozen sentence
    embeddings. Each sampler's ``sample(meta_batch, generator)`` returns a :class:`metafunc.Task`.

    Example:
        >>> samplers = clinc_samplers(lambda texts: torch.randn(len(texts), 8))  # doctest: +SKIP
        >>> samplers["test"].sample(2, torch.Generator().manual_seed(0)).support_x.shape  # doctest: +SKIP
        torch.Size([2, 5, 8])
    """
    out: dict[str, EpisodeSampler] = {}
    for name, examples, labels in _encoded_splits(encode, root, test_domains, "clinc_samplers"):
        out[name] = EpisodeSampler(examples, labels, ways=ways, shots=shots, queries=queries, dtype=dtype)
    return out


def _encoded_splits(encode: Callable[[Sequence[str]], Tensor], root: str | os.PathLike | None,
                    test_domains: Sequence[str], caller: str) -> Iterator[tuple[str, Tensor, Tensor]]:
    """``(split, examples, labels)`` for train/val/test: the encoded texts of the split's domains."""
    if not callable(encode):
        raise TypeError(f"{caller}: encode must be callable as encode(texts) -> tensor (got {type(encode).__name__})")
    for name, split in (("train", "train"), ("val", "val"), ("test", "test")):
        data = load_clinc150(root, split=split)
        train_intents, test_intents = clinc_domain_split(data, test_domains)
        keep = torch.isin(data.labels, torch.tensor(test_intents if name == "test" else train_intents))
        texts = [t for t, k in zip(data.texts, keep.tolist()) if k]
        examples = encode(texts)
        if not isinstance(examples, Tensor) or examples.shape[0] != len(texts):
            raise ValueError(f"{caller}: encode must return a tensor with one row per text "
                             f"(got {type(examples).__name__} {getattr(examples, 'shape', None)} for {len(texts)} texts)")
        yield name, examples, data.labels[keep]


def clinc_variable_samplers(
    encode: Callable[[Sequence[str]], Tensor],
    root: str | os.PathLike | None = None,
    *,
    min_ways: int = 3,
    max_ways: int = 10,
    min_shots: int = 1,
    max_shots: int = 5,
    queries: int = 5,
    max_support: int | None = None,
    test_domains: Sequence[str] = DEFAULT_TEST_DOMAINS,
    dtype: torch.dtype = torch.float32,
) -> dict[str, VariableEpisodeSampler]:
    """Samplers ``{"train", "val", "test"}`` over CLINC150 (the splits of :func:`clinc_samplers`) drawing episodes
    with varying ways and shots, Meta-Dataset style, as padded meta-batches (:class:`metafunc.data.VariableEpisodeSampler`).

    The argument ranges are checked eagerly, before any data is read. The val split has 20 utterances per intent,
    so ``max_shots + queries`` must be at most 20.

    Example:
        >>> samplers = clinc_variable_samplers(lambda texts: torch.randn(len(texts), 8))  # doctest: +SKIP
        >>> tasks = samplers["train"].sample(4, torch.Generator().manual_seed(0))  # doctest: +SKIP
        >>> tasks.support_y.shape[0], int(tasks.query_y.max()) < 10  # doctest: +SKIP
        (4, True)
    """
    def build(examples: Tensor, labels: Tensor) -> VariableEpisodeSampler:
        return VariableEpisodeSampler(examples, labels, min_ways=min_ways, max_ways=max_ways, min_shots=min_shots,
                                      max_shots=max_shots, queries=queries, max_support=max_support, dtype=dtype)

    check_episode_ranges("clinc_variable_samplers", min_ways=min_ways, max_ways=max_ways, min_shots=min_shots,
                         max_shots=max_shots, queries=queries, max_support=max_support)
    return {name: build(examples, labels)
            for name, examples, labels in _encoded_splits(encode, root, test_domains, "clinc_variable_samplers")}
