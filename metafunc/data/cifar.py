"""CIFAR-FS (Bertinetto et al., ICLR 2019) and FC100 (Oreshkin et al., NeurIPS 2018) read straight from the
official CIFAR-100 python release, decoded once and cached as one ``uint8`` tensor file per split.

The release, ``cifar-100-python.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, md5
:data:`CIFAR100_MD5`), holds three pickles: ``cifar-100-python/train`` (50000 images) and ``cifar-100-python/test``
(10000), each a dict with bytes keys ``b"data"`` (``(N, 3072)`` uint8 rows, the red, green then blue 32x32 planes),
``b"fine_labels"`` and ``b"coarse_labels"``; and ``cifar-100-python/meta`` with ``b"fine_label_names"`` (100
classes) and ``b"coarse_label_names"`` (20 superclasses of 5 classes each). The pickles are read from the tarball
without extracting anything, with an unpickler that only builds numpy arrays and plain containers. Both benchmarks
pool the train and test images (600 per class) and split the 100 classes three ways:

* CIFAR-FS: 64 / 16 / 20 classes by fine label name, the split of Bertinetto et al.'s R2D2 repository
  (``data/cifar-fs/splits/bertinetto/{train,val,test}.txt``), shipped as ``metafunc/data/splits/cifar_fs_*.txt``;
* FC100: 12 / 4 / 4 superclasses (60 / 20 / 20 classes) by coarse label name, the split of Oreshkin et al.'s
  TADAM code (coarse ids train {1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19}, val {8, 11, 13, 16}, test {0, 7, 12,
  14}), shipped as ``metafunc/data/splits/fc100_*.txt``.

Classes are numbered ``0..n-1`` in each split in the order of CIFAR-100's fine labels (alphabetical).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import tarfile
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from metafunc.data._benchmark import (
    CACHE_VERSION,
    SPLITS,
    ImageSplit,
    SplitName,
    check_episode_counts,
    check_root,
    check_split,
    default_cache_dir,
    download_checked,
    file_md5,
    read_cache,
    restricted_load,
    safe_relative_path,
    split_samplers,
    text,
    write_cache,
)
from metafunc.data.episodes import SplitSamplers

__all__ = [
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
]

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
"""Where :func:`download_cifar100` fetches the official release from."""

CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
"""md5 of the official ``cifar-100-python.tar.gz``."""

CIFAR100_FILE = "cifar-100-python.tar.gz"
"""The release's file name, looked for in ``root``."""

_MEMBERS = {"train": "cifar-100-python/train", "test": "cifar-100-python/test", "meta": "cifar-100-python/meta"}
_FIX = "delete it and download the official release again (or pass download=True)"


def _split_list(name: str) -> dict[str, tuple[str, ...]]:
    folder = importlib.resources.files("metafunc.data").joinpath("splits")
    return {s: tuple(line.strip() for line in folder.joinpath(f"{name}_{s}.txt").read_text().splitlines()
                     if line.strip()) for s in SPLITS}


CIFAR_FS_CLASSES: dict[str, tuple[str, ...]] = _split_list("cifar_fs")
"""CIFAR-FS: the fine label names of each split (64 / 16 / 20), from Bertinetto et al.'s R2D2 repository."""

FC100_SUPERCLASSES: dict[str, tuple[str, ...]] = _split_list("fc100")
"""FC100: the coarse label (superclass) names of each split (12 / 4 / 4), from Oreshkin et al.'s TADAM code."""


def download_cifar100(root: str | os.PathLike, *, url: str = CIFAR100_URL) -> Path:
    """Download ``cifar-100-python.tar.gz`` into ``root`` unless it is there, checking the md5 before keeping it.

    The file is written to a temporary file in ``root``, its md5 compared with :data:`CIFAR100_MD5`, and only then
    renamed into place, so an interrupted or corrupt download never leaves a tarball behind. Returns its path.

    Example:
        >>> download_cifar100("~/data/cifar100")  # doctest: +SKIP
        PosixPath('.../cifar-100-python.tar.gz')
    """
    if not isinstance(url, str) or not url:
        raise TypeError(f"download_cifar100: url must be a URL string (got {url!r})")
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"download_cifar100: root must be a path (got {type(root).__name__})")
    path = Path(root).expanduser() / CIFAR100_FILE
    if path.is_file():
        return path
    return download_checked("download_cifar100", url, path, CIFAR100_MD5)


def _field(caller: str, label: str, blob: dict[str, Any], key: str) -> Any:
    if key not in blob:
        raise ValueError(f"{caller}: {label} has no key {key!r} (its keys are {sorted(blob)}); the official pickle "
                         f"has {key!r}: {_FIX}")
    return blob[key]


def _as_dict(caller: str, label: str, obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{caller}: {label} holds a {type(obj).__name__}, not the dict of the official release; "
                         f"{_FIX}")
    out = {}
    for k, v in obj.items():
        key = text(k)
        if key is None:
            raise ValueError(f"{caller}: {label} has a non-text key {k!r}; {_FIX}")
        out[key] = v
    return out


def _labels(caller: str, label: str, values: Any, key: str, n: int, classes: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,) or arr.dtype.kind not in "iu":
        raise ValueError(f"{caller}: {label}[{key!r}] must be {n} integer labels, one per row of 'data' (got "
                         f"{arr.dtype} of shape {arr.shape}); {_FIX}")
    if n and (int(arr.min()) < 0 or int(arr.max()) >= classes):
        raise ValueError(f"{caller}: {label}[{key!r}] has labels in [{int(arr.min())}, {int(arr.max())}] but "
                         f"CIFAR-100 has {classes}; {_FIX}")
    return arr.astype(np.int64)


def _names(caller: str, label: str, blob: dict[str, Any], key: str, count: int) -> list[str]:
    values = _field(caller, label, blob, key)
    names = [text(v) for v in values] if isinstance(values, (list, tuple)) else None
    if names is None or len(names) != count or any(n is None for n in names) or len(set(names)) != count:
        raise ValueError(f"{caller}: {label}[{key!r}] must be {count} distinct names (got {values!r:.80}); {_FIX}")
    return [n for n in names if n is not None]


def _read_tarball(caller: str, path: Path) -> dict[str, Any]:
    """The three pickles of the release: {"train": blob, "test": blob, "meta": blob}."""
    found: dict[str, Any] = {}
    wanted = {v: k for k, v in _MEMBERS.items()}
    try:
        archive = tarfile.open(path, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"{caller}: {path} is not a valid tar.gz file ({err}); it is corrupt or truncated: "
                         f"{_FIX}") from err
    with archive:
        try:
            for member in archive:
                safe_relative_path(caller, member.name, path.name)
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name not in wanted:
                    continue
                label = f"{name} in {path.name}"
                if not member.isfile():
                    raise ValueError(f"{caller}: {label} is not a regular file (a link or folder); refusing this "
                                     f"tarball: {_FIX}")
                stream = archive.extractfile(member)
                if stream is None:
                    raise ValueError(f"{caller}: cannot read {label}; {_FIX}")
                with stream:
                    found[wanted[name]] = _as_dict(caller, label, restricted_load(caller, stream, label, _FIX))
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"{caller}: cannot read {path} ({err}); it is corrupt or truncated: {_FIX}") from err
    missing = [_MEMBERS[k] for k in _MEMBERS if k not in found]
    if missing:
        raise ValueError(f"{caller}: {path} lacks {', '.join(missing)}; the official release holds "
                         f"{', '.join(_MEMBERS.values())}: {_FIX}")
    return found


def _decode(caller: str, path: Path) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list[str], list[str]]:
    """All 60000 images (train then test) as (N, 3, 32, 32) uint8, their fine and coarse labels, and the names."""
    blobs = _read_tarball(caller, path)
    meta_label = f"{_MEMBERS['meta']} in {path.name}"
    fine_names = _names(caller, meta_label, blobs["meta"], "fine_label_names", 100)
    coarse_names = _names(caller, meta_label, blobs["meta"], "coarse_label_names", 20)
    images, fine, coarse = [], [], []
    for part in ("train", "test"):
        label = f"{_MEMBERS[part]} in {path.name}"
        data = _field(caller, label, blobs[part], "data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise ValueError(f"{caller}: {label}['data'] must be a uint8 array of shape (N, 3072), one 3x32x32 "
                             f"image per row (got {got}); {_FIX}")
        n = data.shape[0]
        fine.append(_labels(caller, label, _field(caller, label, blobs[part], "fine_labels"), "fine_labels", n, 100))
        coarse.append(_labels(caller, label, _field(caller, label, blobs[part], "coarse_labels"), "coarse_labels",
                              n, 20))
        images.append(torch.from_numpy(np.array(data, copy=True)).view(n, 3, 32, 32))
    fine_all, coarse_all = np.concatenate(fine), np.concatenate(coarse)
    pairs = {(int(f), int(c)) for f, c in zip(fine_all.tolist(), coarse_all.tolist())}
    owners: dict[int, set[int]] = {}
    for f, c in pairs:
        owners.setdefault(f, set()).add(c)
    mixed = [fine_names[f] for f, cs in sorted(owners.items()) if len(cs) > 1]
    if mixed:
        raise ValueError(f"{caller}: in {path.name} the classes {mixed[:5]} belong to more than one superclass; in "
                         f"CIFAR-100 each class has one: {_FIX}")
    return torch.cat(images), fine_all, coarse_all, fine_names, coarse_names


def _build(caller: str, benchmark: str, decoded: tuple[torch.Tensor, np.ndarray, np.ndarray, list[str], list[str]],
           path: Path) -> dict[SplitName, ImageSplit]:
    images, fine, coarse, fine_names, coarse_names = decoded
    fine_t, coarse_t = torch.from_numpy(fine), torch.from_numpy(coarse)
    out: dict[SplitName, ImageSplit] = {}
    for split in SPLITS:
        if benchmark == "cifar_fs":
            unknown = [n for n in CIFAR_FS_CLASSES[split] if n not in fine_names]
            if unknown:
                raise ValueError(f"{caller}: {path.name} has no fine labels named {unknown[:5]} (CIFAR-FS {split} "
                                 f"classes); it is not the official CIFAR-100 release: {_FIX}")
            classes = sorted(fine_names.index(n) for n in CIFAR_FS_CLASSES[split])
        else:
            unknown = [n for n in FC100_SUPERCLASSES[split] if n not in coarse_names]
            if unknown:
                raise ValueError(f"{caller}: {path.name} has no coarse labels named {unknown[:5]} (FC100 {split} "
                                 f"superclasses); it is not the official CIFAR-100 release: {_FIX}")
            supers = torch.tensor([coarse_names.index(n) for n in FC100_SUPERCLASSES[split]])
            classes = sorted(set(fine_t[torch.isin(coarse_t, supers)].tolist()))
            if len(classes) != 5 * len(supers):
                raise ValueError(f"{caller}: the FC100 {split} superclasses {list(FC100_SUPERCLASSES[split])} hold "
                                 f"{len(classes)} classes with images in {path.name}, not {5 * len(supers)}: "
                                 f"{_FIX}")
        new = torch.full((100,), -1, dtype=torch.int64)
        new[classes] = torch.arange(len(classes))
        labels = new[fine_t]
        empty = [fine_names[c] for c in classes if not bool((fine_t == c).any())]
        if empty:
            raise ValueError(f"{caller}: {path.name} has no images of the {benchmark} {split} classes {empty[:5]}; "
                             f"{_FIX}")
        keep = torch.nonzero(labels >= 0).squeeze(1)
        keep = keep[torch.argsort(labels[keep], stable=True)]  # grouped by class, train images before test ones
        out[split] = ImageSplit(images[keep].contiguous(), labels[keep].contiguous(), [fine_names[c] for c in classes])
    return out


def _load(caller: str, benchmark: str, root: Any, splits: Sequence[SplitName], cache_dir: str | os.PathLike | None,
          download: bool, check_md5: bool) -> dict[SplitName, ImageSplit]:
    """The ``splits`` of ``benchmark``: the tarball is found and its md5 checked once, the cache read, or the
    tarball decoded once and all three splits cached."""
    for split in splits:
        check_split(caller, split)
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"{caller}: root must be a path (got {type(root).__name__})")
    if download:
        download_cifar100(root)
    folder = check_root(caller, root, f"{CIFAR100_FILE} (or pass download=True)")
    path = folder / CIFAR100_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{caller}: {folder} lacks {CIFAR100_FILE}; copy the official CIFAR-100 python "
                                f"release there ({CIFAR100_URL}) or pass download=True")
    md5 = file_md5(path)
    if check_md5 and md5 != CIFAR100_MD5:
        raise ValueError(f"{caller}: {path} has md5 {md5} but the official {CIFAR100_FILE} has md5 {CIFAR100_MD5}; "
                         "the file is corrupt, truncated or not the official release: delete it and download it "
                         "again (or pass check_md5=False to read it anyway)")
    key = hashlib.sha1(f"v{CACHE_VERSION}|{benchmark}|{md5}".encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    files = {s: cache / f"{benchmark}-{s}-{key}.pt" for s in SPLITS}
    found = {s: read_cache(files[s]) for s in splits}
    if all(v is not None for v in found.values()):
        return {s: v for s, v in found.items() if v is not None}
    built = _build(caller, benchmark, _decode(caller, path), path)
    for s in SPLITS:  # one pass over the tarball writes all three splits
        write_cache(files[s], built[s])
    return {s: built[s] for s in splits}


def load_cifar_fs(
    root: str | os.PathLike,
    split: Literal["train", "val", "test"] = "train",
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    check_md5: bool = True,
) -> ImageSplit:
    """One split of CIFAR-FS (Bertinetto et al. 2019: 64 / 16 / 20 classes of 600 32x32 images) from the official
    ``cifar-100-python.tar.gz`` in ``root``.

    ``images`` is uint8 ``(N, 3, 32, 32)`` (38400 / 9600 / 12000 images), ``labels`` int64 ``0..n-1`` into
    ``class_names`` (fine label names, alphabetical; the lists are :data:`CIFAR_FS_CLASSES`). The tarball's md5 is
    checked against :data:`CIFAR100_MD5` (``check_md5=False`` reads another tarball of the same format);
    ``download=True`` fetches a missing one with :func:`download_cifar100`. The first call decodes the tarball once
    and caches all three splits in ``cache_dir`` (default ``$METAFUNC_CACHE`` or ``~/.cache/metafunc``) as
    ``cifar_fs-<split>-<key>.pt``, the key hashing the tarball's md5; later calls read the cache.

    Example:
        >>> data = load_cifar_fs("shared/data/cifar100", "test")  # doctest: +SKIP
        >>> data.images.shape, data.images.dtype, data.num_classes  # doctest: +SKIP
        (torch.Size([12000, 3, 32, 32]), torch.uint8, 20)
    """
    return _load("load_cifar_fs", "cifar_fs", root, [split], cache_dir, download, check_md5)[split]


def load_fc100(
    root: str | os.PathLike,
    split: Literal["train", "val", "test"] = "train",
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    check_md5: bool = True,
) -> ImageSplit:
    """One split of FC100 (Oreshkin et al. 2018: 12 / 4 / 4 superclasses, 60 / 20 / 20 classes of 600 32x32 images)
    from the official ``cifar-100-python.tar.gz`` in ``root``.

    Test classes come from superclasses never seen in training (:data:`FC100_SUPERCLASSES`). ``class_names`` are
    the fine label names (alphabetical); everything else is as in :func:`load_cifar_fs` (cache file
    ``fc100-<split>-<key>.pt``).

    Example:
        >>> data = load_fc100("shared/data/cifar100", "train")  # doctest: +SKIP
        >>> data.images.shape, data.num_classes  # doctest: +SKIP
        (torch.Size([36000, 3, 32, 32]), 60)
    """
    return _load("load_fc100", "fc100", root, [split], cache_dir, download, check_md5)[split]


def _samplers(caller: str, benchmark: str, root: str | os.PathLike, ways: int, shots: int, queries: int,
              device: torch.device | str | None, cache_dir: str | os.PathLike | None, download: bool,
              check_md5: bool, val_ways: int | None) -> SplitSamplers:
    check_episode_counts(caller, ways=ways, shots=shots, queries=queries, val_ways=val_ways)
    splits = _load(caller, benchmark, root, SPLITS, cache_dir, download, check_md5)
    return split_samplers(caller, splits, ways=ways, shots=shots, queries=queries, device=device, val_ways=val_ways)


def cifar_fs_samplers(
    root: str | os.PathLike,
    *,
    ways: int,
    shots: int,
    queries: int,
    device: torch.device | str | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    check_md5: bool = True,
    val_ways: int | None = None,
) -> SplitSamplers:
    """Episode samplers for CIFAR-FS's ``"train"``, ``"val"`` and ``"test"`` splits, the data on ``device``.

    Loads (or reads the cache of) :func:`load_cifar_fs` for each split and returns a
    :class:`~metafunc.data.SplitSamplers`, one :class:`~metafunc.data.EpisodeSampler` per split (no rotations),
    each built (copied to ``device`` and checked against its ways) when first read, so one split's size never caps
    another's ways. ``"train"`` and ``"test"`` are ``ways``-way; ``"val"`` is ``val_ways``-way (default: ``ways``,
    or all of its classes when it has fewer; ``samplers.ways["val"]`` says which). ``sample(meta_batch,
    generator)`` gives float images in ``[0, 1]`` of shape ``(meta_batch, ways * shots, 3, 32, 32)`` and int64
    labels ``0..ways-1`` shuffled per task. The class split is fixed by the paper: ``seed`` changes nothing (it is
    taken so every ``*_samplers`` has the same arguments).

    Example:
        >>> samplers = cifar_fs_samplers("shared/data/cifar100", ways=5, shots=1, queries=15)  # doctest: +SKIP
        >>> samplers["train"].sample(8, torch.Generator().manual_seed(0)).support_x.shape  # doctest: +SKIP
        torch.Size([8, 5, 3, 32, 32])
    """
    return _samplers("cifar_fs_samplers", "cifar_fs", root, ways, shots, queries, device, cache_dir, download,
                     check_md5, val_ways)


def fc100_samplers(
    root: str | os.PathLike,
    *,
    ways: int,
    shots: int,
    queries: int,
    device: torch.device | str | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    check_md5: bool = True,
    val_ways: int | None = None,
) -> SplitSamplers:
    """Episode samplers for FC100's ``"train"``, ``"val"`` and ``"test"`` splits, the data on ``device``.

    As :func:`cifar_fs_samplers`, with the superclass split of :func:`load_fc100`.

    Example:
        >>> samplers = fc100_samplers("shared/data/cifar100", ways=5, shots=5, queries=15)  # doctest: +SKIP
        >>> samplers["test"].num_classes  # doctest: +SKIP
        20
    """
    return _samplers("fc100_samplers", "fc100", root, ways, shots, queries, device, cache_dir, download, check_md5,
                     val_ways)
