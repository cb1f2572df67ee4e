"""miniImageNet (Vinyals et al. 2016, the split of Ravi & Larochelle 2017) and tieredImageNet (Ren et al. 2018) from
the files they are distributed as, decoded once and cached as one ``uint8`` tensor file per split.

miniImageNet: 100 ImageNet classes of 600 images, 64 / 16 / 20 for train / val / test, 84x84 RGB. Two sources:

* ``source="csv"``: the split files of Ravi & Larochelle, ``train.csv``, ``val.csv``, ``test.csv`` (header
  ``filename,label``, one line per image) in ``root``, and the images under ``root/images/<filename>`` (any size,
  any mode; decoded with Pillow, converted to RGB and resized to 84x84 with LANCZOS, as their scripts do);
* ``source="pickle"``: the caches learn2learn downloads, ``mini-imagenet-cache-{train,validation,test}.pkl``, each a
  dict with ``"image_data"`` (``(N, 84, 84, 3)`` uint8) and ``"class_dict"`` (class name -> list of row indices).

tieredImageNet: 608 ImageNet classes in 34 high-level categories, 351 / 97 / 160 classes for train / val / test
(categories disjoint across splits), 84x84 RGB, as ``{split}_images_png.pkl`` (a list or array of PNG-encoded
images) and ``{split}_labels.pkl`` (a dict with ``"label_specific"``, one class id per image, and optionally
``"label_general"``, ``"label_specific_str"``, ``"label_general_str"``) in ``root``, ``split`` in ``train``,
``val``, ``test``.

The class lists are defined by the files; each loader checks that a split has the paper's number of classes
(:data:`MINI_IMAGENET_CLASSES`, :data:`TIERED_IMAGENET_CLASSES`; ``strict_counts=False`` loads a subset). Pickles
are read with an unpickler that only builds numpy arrays and plain containers. Classes are numbered ``0..n-1`` per
split in sorted order of their names (miniImageNet) or ids (tieredImageNet).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from metafunc.data._benchmark import (
    CACHE_VERSION,
    SPLITS,
    ImageSplit,
    SplitName,
    check_episode_counts,
    check_image_size,
    check_root,
    check_split,
    decode_images,
    default_cache_dir,
    file_fingerprint,
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
    "load_mini_imagenet",
    "mini_imagenet_samplers",
    "load_tiered_imagenet",
    "tiered_imagenet_samplers",
    "MINI_IMAGENET_CLASSES",
    "TIERED_IMAGENET_CLASSES",
    "MINI_IMAGENET_PICKLES",
]

MINI_IMAGENET_CLASSES = {"train": 64, "val": 16, "test": 20}
"""Classes per split of miniImageNet in the split of Ravi & Larochelle (2017)."""

TIERED_IMAGENET_CLASSES = {"train": 351, "val": 97, "test": 160}
"""Classes per split of tieredImageNet (Ren et al., 2018)."""

MINI_IMAGENET_PICKLES = {"train": "mini-imagenet-cache-train.pkl", "val": "mini-imagenet-cache-validation.pkl",
                         "test": "mini-imagenet-cache-test.pkl"}
"""The learn2learn cache file of each split."""

_MINI_FIX = "use the original file (learn2learn's mini-imagenet-cache-<split>.pkl) or the images folder with the " \
            "split CSVs (source='csv')"
_TIERED_FIX = "use the original files of Ren et al. ({split}_images_png.pkl and {split}_labels.pkl)"


def _key(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, (f"v{CACHE_VERSION}", *parts))).encode()).hexdigest()[:16]


def _cache_path(cache_dir: str | os.PathLike | None, stem: str, key: str) -> Path:
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return cache / f"{stem}-{key}.pt"


def _check_counts(caller: str, data: ImageSplit, split: str, paper: dict[str, int], source: str,
                  strict_counts: bool) -> ImageSplit:
    if strict_counts and data.num_classes != paper[split]:
        raise ValueError(f"{caller}: {source} has {data.num_classes} classes but the {split!r} split of the paper "
                         f"has {paper[split]}; it is a subset or another split: pass strict_counts=False to load it "
                         "anyway")
    return data


def _numbered(labels: list[Any]) -> tuple[Tensor, list[Any]]:
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[c] for c in labels], dtype=torch.int64), classes


def _grouped(images: Tensor, labels: Tensor, names: list[str]) -> ImageSplit:
    order = torch.argsort(labels, stable=True)
    return ImageSplit(images[order].contiguous(), labels[order].contiguous(), names)


def _resized(images: Tensor, size: int) -> Tensor:
    """(N, 3, H, W) uint8 images resized to size x size with Pillow's LANCZOS (no-op when they already are)."""
    if images.shape[-2:] == (size, size):
        return images
    from PIL import Image

    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for i, im in enumerate(images.permute(0, 2, 3, 1).numpy()):
        small = Image.fromarray(im).resize((size, size), Image.Resampling.LANCZOS)
        out[i] = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    return out


# ------------------------------------------------------------------------------------------- miniImageNet: CSVs


def _read_split_csv(caller: str, path: Path) -> list[tuple[str, str]]:
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{caller}: {path} is not a text file ({err}); it should be the split CSV of Ravi & "
                         "Larochelle, a header 'filename,label' then one 'filename,label' line per image") from err
    reader = csv.reader(io.StringIO(content))
    header = next(reader, None)
    if header is None or [c.strip() for c in header] != ["filename", "label"]:
        raise ValueError(f"{caller}: {path} must start with the header line 'filename,label' (got "
                         f"{','.join(header or [])!r}); it should be the split CSV of Ravi & Larochelle: add the "
                         "header or use the original file")
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for row in reader:
        if not any(c.strip() for c in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"{caller}: line {reader.line_num} of {path} is {','.join(row)!r}; every line after the "
                             "header must be 'filename,label' (e.g. n0153282900000005.jpg,n01532829): fix the line")
        name, label = row[0].strip(), row[1].strip()
        safe_relative_path(caller, name, path.name)
        if name in seen:
            raise ValueError(f"{caller}: {path} lists {name!r} twice (again on line {reader.line_num}); each image "
                             "belongs to one class: remove the duplicate line")
        seen.add(name)
        rows.append((name, label))
    if not rows:
        raise ValueError(f"{caller}: {path} lists no images (only the header); use the original split CSV")
    return rows


def _load_mini_csv(caller: str, root: Path, split: str, size: int, cache_dir: str | os.PathLike | None
                   ) -> tuple[ImageSplit, str]:
    csv_path = root / f"{split}.csv"
    rows = _read_split_csv(caller, csv_path)
    folder = root / "images"
    if not folder.is_dir():
        raise FileNotFoundError(f"{caller}: {root} has {csv_path.name} but no images/ folder; put the miniImageNet "
                                "images there (images/<filename> for each filename of the CSV)")
    h = hashlib.md5(csv_path.read_bytes())
    missing = []
    for name, _ in rows:
        try:
            st = (folder / name).stat()
        except FileNotFoundError:
            missing.append(name)
            continue
        h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}".encode())
    if missing:
        raise FileNotFoundError(f"{caller}: {len(missing)} of the {len(rows)} images that {csv_path.name} lists are "
                                f"missing from {folder} (e.g. {missing[:3]}); copy the full images folder there, or "
                                "use the learn2learn pickles (source='pickle')")
    cache_file = _cache_path(cache_dir, f"mini_imagenet-csv-{split}-{size}", _key("csv", size, h.hexdigest()))
    cached = read_cache(cache_file)
    if cached is not None:
        return cached, csv_path.name
    paths = [folder / name for name, _ in rows]
    images = decode_images(caller, paths, size, lambda i: str(paths[i]))
    labels, names = _numbered([label for _, label in rows])
    data = _grouped(images, labels, names)
    write_cache(cache_file, data)
    return data, csv_path.name


# ------------------------------------------------------------------------------------ miniImageNet: learn2learn


def _as_dict(caller: str, label: str, obj: Any, fix: str, expected: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{caller}: {label} holds a {type(obj).__name__}, not {expected}; {fix}")
    out = {}
    for k, v in obj.items():
        key = text(k)
        if key is None:
            raise ValueError(f"{caller}: {label} has a non-text key {k!r}; {fix}")
        out[key] = v
    return out


def _load_mini_pickle(caller: str, root: Path, split: str, size: int, cache_dir: str | os.PathLike | None
                      ) -> tuple[ImageSplit, str]:
    path = root / MINI_IMAGENET_PICKLES[split]
    cache_file = _cache_path(cache_dir, f"mini_imagenet-pickle-{split}-{size}", _key("pickle", size,
                                                                                      file_fingerprint(path)))
    cached = read_cache(cache_file)
    if cached is not None:
        return cached, path.name
    expected = "the learn2learn dict with 'image_data' and 'class_dict'"
    with open(path, "rb") as f:
        blob = _as_dict(caller, path.name, restricted_load(caller, f, path.name, _MINI_FIX), _MINI_FIX, expected)
    missing = [k for k in ("image_data", "class_dict") if k not in blob]
    if missing:
        raise ValueError(f"{caller}: {path.name} lacks the key(s) {missing} (its keys are {sorted(blob)}); it should "
                         f"be {expected}: {_MINI_FIX}")
    data = blob["image_data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3 \
            or data.shape[1] != data.shape[2]:
        got = f"{data.dtype} of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{caller}: {path.name}['image_data'] must be a uint8 array of shape (N, 84, 84, 3) (got "
                         f"{got}); {_MINI_FIX}")
    n = data.shape[0]
    class_dict = _as_dict(caller, f"{path.name}['class_dict']", blob["class_dict"], _MINI_FIX,
                          "a dict of class name -> list of row indices")
    owner = np.full(n, -1, dtype=np.int64)
    names = sorted(class_dict)
    for i, name in enumerate(names):
        rows = np.asarray(class_dict[name])
        if rows.ndim != 1 or rows.dtype.kind not in "iu" or rows.size == 0:
            raise ValueError(f"{caller}: {path.name}['class_dict'][{name!r}] must be a non-empty list of row indices "
                             f"(got {rows.dtype} of shape {rows.shape}); {_MINI_FIX}")
        if int(rows.min()) < 0 or int(rows.max()) >= n:
            raise ValueError(f"{caller}: {path.name}['class_dict'][{name!r}] has row indices in [{int(rows.min())}, "
                             f"{int(rows.max())}] but 'image_data' has {n} rows; {_MINI_FIX}")
        if (owner[rows] >= 0).any() or len(np.unique(rows)) != rows.size:
            raise ValueError(f"{caller}: {path.name}['class_dict'][{name!r}] lists rows that another class (or this "
                             f"one) lists already; each image belongs to one class: {_MINI_FIX}")
        owner[rows] = i
    if (owner < 0).any():
        raise ValueError(f"{caller}: {path.name}['class_dict'] gives no class to {int((owner < 0).sum())} of the {n} "
                         f"rows of 'image_data'; {_MINI_FIX}")
    images = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
    result = _grouped(_resized(images, size), torch.from_numpy(owner), names)
    write_cache(cache_file, result)
    return result, path.name


def _resolve_source(caller: str, root: Path, split: str, source: str) -> str:
    if source not in ("auto", "csv", "pickle"):
        raise ValueError(f"{caller}: source must be 'auto', 'csv' or 'pickle' (got {source!r})")
    pickle_file, csv_file = root / MINI_IMAGENET_PICKLES[split], root / f"{split}.csv"
    if source == "auto":
        source = "pickle" if pickle_file.is_file() else "csv" if csv_file.is_file() else "auto"
    lacks = {"auto": f"{pickle_file.name} and {csv_file.name}", "pickle": pickle_file.name, "csv": csv_file.name}
    if source == "auto" or not (pickle_file if source == "pickle" else csv_file).is_file():
        raise FileNotFoundError(f"{caller}: {root} lacks {lacks[source]}; put there learn2learn's {pickle_file.name}, "
                                f"or {csv_file.name} (the split of Ravi & Larochelle) and the images under images/")
    return source


def load_mini_imagenet(
    root: str | os.PathLike,
    split: Literal["train", "val", "test"] = "train",
    *,
    source: Literal["auto", "csv", "pickle"] = "auto",
    image_size: int = 84,
    cache_dir: str | os.PathLike | None = None,
    strict_counts: bool = True,
) -> ImageSplit:
    """One split of miniImageNet (Ravi & Larochelle 2017: 64 / 16 / 20 classes of 600 images) from ``root``.

    ``source="pickle"`` reads learn2learn's ``mini-imagenet-cache-<split>.pkl`` (``validation`` for ``"val"``);
    ``source="csv"`` reads ``<split>.csv`` (header ``filename,label``) and the images under ``root/images/``;
    ``"auto"`` takes the pickle when it is there, else the CSV. ``images`` is uint8 ``(N, 3, image_size,
    image_size)``, ``labels`` int64 ``0..n-1`` into ``class_names`` (the WordNet ids, sorted). A split whose class
    count is not the paper's is refused unless ``strict_counts=False``. The decoded split is cached in ``cache_dir``
    (default ``$METAFUNC_CACHE`` or ``~/.cache/metafunc``), keyed by the source files (the CSV's md5 and each image's
    size and time; the pickle's size, time and first and last MiB) and the image size.

    Example:
        >>> data = load_mini_imagenet("shared/data/mini-imagenet", "val")  # doctest: +SKIP
        >>> data.images.shape, data.num_classes  # doctest: +SKIP
        (torch.Size([9600, 3, 84, 84]), 16)
    """
    caller = "load_mini_imagenet"
    check_split(caller, split)
    size = check_image_size(caller, image_size)
    folder = check_root(caller, root, f"{MINI_IMAGENET_PICKLES[split]} or {split}.csv and images/")
    kind = _resolve_source(caller, folder, split, source)
    if kind == "pickle":
        data, name = _load_mini_pickle(caller, folder, split, size, cache_dir)
    else:
        data, name = _load_mini_csv(caller, folder, split, size, cache_dir)
    return _check_counts(caller, data, split, MINI_IMAGENET_CLASSES, name, strict_counts)


def _disjoint(caller: str, splits: dict[SplitName, ImageSplit]) -> None:
    pairs: tuple[tuple[SplitName, SplitName], ...] = (("train", "val"), ("train", "test"), ("val", "test"))
    for a, b in pairs:
        shared = sorted(set(splits[a].class_names) & set(splits[b].class_names))
        if shared:
            raise ValueError(f"{caller}: the classes {shared[:5]} are in both the {a!r} and the {b!r} split; the "
                             "splits of a few-shot benchmark share no class: use the original split files")


def mini_imagenet_samplers(
    root: str | os.PathLike,
    *,
    ways: int,
    shots: int,
    queries: int,
    device: torch.device | str | None = None,
    seed: int = 0,
    source: Literal["auto", "csv", "pickle"] = "auto",
    image_size: int = 84,
    cache_dir: str | os.PathLike | None = None,
    strict_counts: bool = True,
    val_ways: int | None = None,
) -> SplitSamplers:
    """Episode samplers for miniImageNet's ``"train"``, ``"val"`` and ``"test"`` splits, the data on ``device``.

    Loads (or reads the cache of) :func:`load_mini_imagenet` for each split, checks that the splits share no class,
    and returns a :class:`~metafunc.data.SplitSamplers`, one :class:`~metafunc.data.EpisodeSampler` per split (no
    rotations): float images in ``[0, 1]`` of shape ``(meta_batch, ways * shots, 3, image_size, image_size)``. Each
    sampler is built when first read, so one split's size never caps another's ways: ``"train"`` and ``"test"`` are
    ``ways``-way, ``"val"`` is ``val_ways``-way (default: ``ways``, or all of its classes when it has fewer). The
    split is fixed by the files: ``seed`` changes nothing (it is taken so every ``*_samplers`` has the same
    arguments).

    Example:
        >>> samplers = mini_imagenet_samplers("shared/data/mini-imagenet", ways=5, shots=1, queries=15)  # doctest: +SKIP
        >>> samplers["train"].sample(4, torch.Generator().manual_seed(0)).support_x.shape  # doctest: +SKIP
        torch.Size([4, 5, 3, 84, 84])
    """
    caller = "mini_imagenet_samplers"
    check_episode_counts(caller, ways=ways, shots=shots, queries=queries, val_ways=val_ways)
    splits = {s: load_mini_imagenet(root, s, source=source, image_size=image_size, cache_dir=cache_dir,
                                    strict_counts=strict_counts) for s in SPLITS}
    _disjoint(caller, splits)
    return split_samplers(caller, splits, ways=ways, shots=shots, queries=queries, device=device, val_ways=val_ways)


# ------------------------------------------------------------------------------------------------ tieredImageNet


def _tiered_labels(caller: str, path: Path, split: str) -> tuple[np.ndarray, list[str] | None]:
    fix = _TIERED_FIX.format(split=split)
    expected = "the dict with 'label_specific' (and 'label_general', 'label_specific_str') of Ren et al."
    with open(path, "rb") as f:
        blob = _as_dict(caller, path.name, restricted_load(caller, f, path.name, fix), fix, expected)
    if "label_specific" not in blob:
        raise ValueError(f"{caller}: {path.name} has no key 'label_specific' (its keys are {sorted(blob)}); it "
                         f"should be {expected}: {fix}")
    labels = np.asarray(blob["label_specific"])
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.size == 0 or int(labels.min()) < 0:
        raise ValueError(f"{caller}: {path.name}['label_specific'] must be non-negative integer class ids, one per "
                         f"image (got {labels.dtype} of shape {labels.shape}); {fix}")
    if "label_general" in blob and np.asarray(blob["label_general"]).shape != labels.shape:
        raise ValueError(f"{caller}: {path.name}['label_general'] has shape "
                         f"{np.asarray(blob['label_general']).shape} but 'label_specific' has {labels.shape}; {fix}")
    names = None
    if "label_specific_str" in blob:
        raw = blob["label_specific_str"]
        names = [text(v) for v in raw] if isinstance(raw, (list, tuple, np.ndarray)) else None
        if names is None or any(v is None for v in names) or len(names) <= int(labels.max()):
            raise ValueError(f"{caller}: {path.name}['label_specific_str'] must hold one name per class id "
                             f"(ids go up to {int(labels.max())}; got {raw!r:.80}); {fix}")
    return labels.astype(np.int64), [v for v in names if v is not None] if names is not None else None


def _tiered_images(caller: str, path: Path, split: str) -> list[Any]:
    fix = _TIERED_FIX.format(split=split)
    with open(path, "rb") as f:
        items = restricted_load(caller, f, path.name, fix)
    if isinstance(items, np.ndarray) and items.dtype == object and items.ndim == 1:
        items = list(items)
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"{caller}: {path.name} holds a {type(items).__name__}, not the non-empty list of "
                         f"PNG-encoded images of Ren et al.; {fix}")
    for i, item in enumerate(items):
        ok = isinstance(item, (bytes, bytearray)) or (isinstance(item, np.ndarray) and item.dtype == np.uint8
                                                      and item.ndim == 1)
        if not ok:
            got = f"{item.dtype} array of shape {item.shape}" if isinstance(item, np.ndarray) else type(item).__name__
            raise ValueError(f"{caller}: item {i} of {path.name} is a {got}, not PNG-encoded bytes (bytes or a 1-D "
                             f"uint8 array); {fix}")
    return list(items)


def load_tiered_imagenet(
    root: str | os.PathLike,
    split: Literal["train", "val", "test"] = "train",
    *,
    image_size: int = 84,
    cache_dir: str | os.PathLike | None = None,
    strict_counts: bool = True,
) -> ImageSplit:
    """One split of tieredImageNet (Ren et al. 2018: 351 / 97 / 160 classes, 84x84) from ``<split>_images_png.pkl``
    and ``<split>_labels.pkl`` in ``root``.

    The PNGs are decoded with Pillow (converted to RGB, resized with LANCZOS if ``image_size`` is not theirs).
    ``labels`` are int64 ``0..n-1`` in sorted order of ``label_specific``; ``class_names`` are the names of
    ``label_specific_str`` when the file has them, else ``"<split>-<id>"``. A split whose class count is not the
    paper's is refused unless ``strict_counts=False``. Cached like :func:`load_mini_imagenet` (the train split is
    448695 images: 9.5 GB as uint8, memory-mapped from the cache when read back).

    Example:
        >>> data = load_tiered_imagenet("shared/data/tiered-imagenet", "test")  # doctest: +SKIP
        >>> data.images.shape, data.num_classes  # doctest: +SKIP
        (torch.Size([206209, 3, 84, 84]), 160)
    """
    caller = "load_tiered_imagenet"
    check_split(caller, split)
    size = check_image_size(caller, image_size)
    image_file, label_file = f"{split}_images_png.pkl", f"{split}_labels.pkl"
    folder = check_root(caller, root, f"{image_file} and {label_file}")
    missing = [name for name in (image_file, label_file) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{caller}: {folder} lacks {' and '.join(missing)}; copy the tieredImageNet files "
                                f"of Ren et al. there ({image_file} and {label_file} for split={split!r})")
    images_path, labels_path = folder / image_file, folder / label_file
    key = _key("tiered", size, file_fingerprint(images_path), file_fingerprint(labels_path))
    cache_file = _cache_path(cache_dir, f"tiered_imagenet-{split}-{size}", key)
    data = read_cache(cache_file)
    if data is None:
        labels, names = _tiered_labels(caller, labels_path, split)
        items = _tiered_images(caller, images_path, split)
        if len(items) != labels.shape[0]:
            raise ValueError(f"{caller}: {image_file} holds {len(items)} images but {label_file} has "
                             f"{labels.shape[0]} labels; the two files are from different splits or releases: "
                             f"{_TIERED_FIX.format(split=split)}")
        images = decode_images(caller, items, size, lambda i: f"image {i} of {image_file}")
        del items
        numbered, ids = _numbered(labels.tolist())
        class_names = [names[i] if names is not None else f"{split}-{i}" for i in ids]
        data = _grouped(images, numbered, class_names)
        write_cache(cache_file, data)
    return _check_counts(caller, data, split, TIERED_IMAGENET_CLASSES, label_file, strict_counts)


def tiered_imagenet_samplers(
    root: str | os.PathLike,
    *,
    ways: int,
    shots: int,
    queries: int,
    device: torch.device | str | None = None,
    seed: int = 0,
    image_size: int = 84,
    cache_dir: str | os.PathLike | None = None,
    strict_counts: bool = True,
    val_ways: int | None = None,
) -> SplitSamplers:
    """Episode samplers for tieredImageNet's ``"train"``, ``"val"`` and ``"test"`` splits, the data on ``device``.

    As :func:`mini_imagenet_samplers`, with :func:`load_tiered_imagenet`.

    Example:
        >>> samplers = tiered_imagenet_samplers("shared/data/tiered-imagenet", ways=5, shots=5, queries=15)  # doctest: +SKIP
        >>> samplers["val"].num_classes  # doctest: +SKIP
        97
    """
    caller = "tiered_imagenet_samplers"
    check_episode_counts(caller, ways=ways, shots=shots, queries=queries, val_ways=val_ways)
    splits = {s: load_tiered_imagenet(root, s, image_size=image_size, cache_dir=cache_dir,
                                      strict_counts=strict_counts) for s in SPLITS}
    _disjoint(caller, splits)
    return split_samplers(caller, splits, ways=ways, shots=shots, queries=queries, device=device, val_ways=val_ways)
