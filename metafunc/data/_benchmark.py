"""What the image benchmarks (:mod:`metafunc.data.cifar`, :mod:`metafunc.data.mini_imagenet`) share: the decoded
split (:class:`ImageSplit`), file fingerprints, a pickle reader that only builds numpy arrays and plain containers,
Pillow decoding into a preallocated ``uint8`` tensor, the one-file cache, md5-checked downloads and the samplers."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Literal, NamedTuple, Sequence

import torch
from torch import Tensor

from metafunc._shared import save_atomic
from metafunc.data.episodes import EpisodeSampler

__all__ = [
    "ImageSplit",
    "SplitName",
    "SPLITS",
    "CACHE_VERSION",
    "check_split",
    "check_root",
    "check_image_size",
    "file_md5",
    "file_fingerprint",
    "default_cache_dir",
    "restricted_load",
    "text",
    "safe_relative_path",
    "decode_images",
    "read_cache",
    "write_cache",
    "download_checked",
    "split_samplers",
]

SplitName = Literal["train", "val", "test"]

SPLITS: tuple[SplitName, ...] = ("train", "val", "test")
"""The three splits every benchmark has."""

CACHE_VERSION = 1
"""Bumped when the decoding changes, so old caches are not reused."""


class ImageSplit(NamedTuple):
    """One split of an image benchmark: ``images`` uint8 ``(N, 3, H, W)`` (RGB, 0..255), ``labels`` int64 ``(N,)``
    class ids ``0..num_classes-1`` into ``class_names`` (one name per class, in label order).

    Example:
        >>> split = ImageSplit(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), ["a", "b"])
        >>> split.num_classes, split.images.shape
        (2, torch.Size([4, 3, 8, 8]))
    """

    images: Tensor
    labels: Tensor
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


def check_split(caller: str, split: Any) -> str:
    """``split`` if it is ``"train"``, ``"val"`` or ``"test"``; a ``ValueError`` naming the choices otherwise."""
    if split not in SPLITS:
        raise ValueError(f"{caller}: split must be 'train', 'val' or 'test' (got {split!r})")
    return split


def check_root(caller: str, root: Any, holds: str) -> Path:
    """``root`` as an existing folder; ``holds`` says in the error what the folder should contain."""
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"{caller}: root must be a path (got {type(root).__name__})")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{caller}: the data root {str(path)!r} does not exist or is not a folder; pass the "
                                f"folder holding {holds}")
    return path


def check_image_size(caller: str, image_size: Any) -> int:
    """``image_size`` as a positive int."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"{caller}: image_size must be a positive int (got {image_size!r})")
    return image_size


def file_md5(path: Path) -> str:
    """The md5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(path: Path) -> str:
    """A cheap identity of a (possibly many-GB) file: its size, modification time and the md5 of its first and last
    MiB. Rewriting or replacing the file changes it; reading does not."""
    st = path.stat()
    h = hashlib.md5(f"{st.st_size}|{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$METAFUNC_CACHE`` or ``~/.cache/metafunc`` (the folder Omniglot's cache uses too)."""
    return Path(os.environ.get("METAFUNC_CACHE", Path.home() / ".cache" / "metafunc")).expanduser()


# Everything a pickle of numpy arrays, dicts, lists, strings and numbers references (written by Python 2 or 3, numpy
# 1 or 2, protocols 0-5). Anything else (a class, os.system, ...) is refused: loading a pickle can run code.
_NUMPY_GLOBALS = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}
_PLAIN_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")}


class _Refused(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], label: str):
        super().__init__(file, encoding="bytes")
        self.label = label

    def find_class(self, module: str, name: str) -> Any:
        parts = module.split(".")
        if parts[0] == "numpy" and len(parts) == 3 and parts[1] in ("core", "_core") \
                and (parts[2], name) in _NUMPY_GLOBALS:
            import numpy

            core = "_core" if int(numpy.__version__.split(".")[0]) >= 2 else "core"
            return super().find_class(f"numpy.{core}.{parts[2]}", name)
        if (module, name) in _PLAIN_GLOBALS:
            return super().find_class(module, name)
        raise _Refused(
            f"{self.label} references {module}.{name}, which a data file of numpy arrays never needs (a pickle can "
            "run code); refusing it"
        )


def restricted_load(caller: str, file: IO[bytes], label: str, fix: str) -> Any:
    """Unpickle ``file`` (bytes keys stay bytes, as Python 2 wrote them), allowing numpy arrays and plain containers
    only. Any failure is a ``ValueError`` naming ``label`` and ``fix``."""
    try:
        return _RestrictedUnpickler(file, label).load()
    except _Refused as err:
        raise ValueError(f"{caller}: cannot read {label} ({err}); {fix}") from err
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
            ImportError) as err:
        raise ValueError(f"{caller}: cannot read {label} as a pickle ({type(err).__name__}: {err}); it is corrupt "
                         f"or truncated; {fix}") from err


def text(value: Any) -> str | None:
    """``value`` as a str (bytes are decoded as UTF-8, numpy strings unwrapped); ``None`` for anything else."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        return str(value)
    return None


def safe_relative_path(caller: str, name: str, where: str) -> PurePosixPath:
    """``name`` as a relative POSIX path, refusing one that is absolute or climbs out (``..``) of its folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    if not name or p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise ValueError(f"{caller}: {where} holds the entry {name!r}, whose path escapes the data folder; refusing "
                         "it (it is not the official release)")
    return p


def _decode_one(raw: Any, size: int) -> bytes:
    from PIL import Image

    source: Any = raw if isinstance(raw, Path) else io.BytesIO(raw)
    with Image.open(source) as opened:
        im: Image.Image = opened.convert("RGB")
        if im.size != (size, size):
            # LANCZOS, as the miniImageNet scripts of Ravi & Larochelle resize; the whole image, aspect not kept
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        return im.tobytes()


def decode_images(caller: str, items: Sequence[Any], size: int, describe: Callable[[int], str],
                  workers: int | None = None) -> Tensor:
    """Decode ``items`` (encoded bytes or 1-D uint8 arrays of them, or paths of image files) with Pillow into one ``(N, 3, size, size)`` uint8
    tensor (RGB, resized with LANCZOS where needed), on ``workers`` threads (Pillow releases the GIL while decoding).
    ``describe(i)`` names item ``i`` in the error raised for an undecodable one."""
    from PIL import UnidentifiedImageError

    n = len(items)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            try:
                data = _decode_one(items[i], size)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
                raise ValueError(f"{caller}: cannot decode {describe(i)} ({err}); the file is corrupt: replace it "
                                 "with the original") from err
            out[i] = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)

    workers = workers or min(8, os.cpu_count() or 1)
    chunk = max(1, -(-n // (workers * 4)))
    if workers == 1 or n <= chunk:
        work(0, n)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(work, s, min(s + chunk, n)) for s in range(0, n, chunk)]:
                future.result()
    return out


def read_cache(path: Path) -> ImageSplit | None:
    """The split cached at ``path`` (memory-mapped), or ``None`` when it is missing or damaged (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        images, labels, names = blob["images"], blob["labels"], list(blob["class_names"])
    except Exception:  # a damaged cache is rebuilt by the caller
        return None
    if not (isinstance(images, Tensor) and images.dtype == torch.uint8 and images.dim() == 4
            and isinstance(labels, Tensor) and labels.dtype == torch.int64 and labels.shape == images.shape[:1]
            and all(isinstance(n, str) for n in names)):
        return None
    return ImageSplit(images, labels, names)


def write_cache(path: Path, data: ImageSplit) -> None:
    """Write ``data`` to ``path`` atomically; a read-only cache folder only costs speed."""
    try:
        save_atomic({"images": data.images, "labels": data.labels, "class_names": list(data.class_names)}, path)
    except OSError:
        pass


def _fetch(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out)


def download_checked(caller: str, url: str, dest: Path, md5: str) -> Path:
    """Fetch ``url`` into a temporary file beside ``dest``, check its md5, and only then rename it to ``dest``; an
    interrupted or wrong download leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        try:
            _fetch(url, Path(tmp))
        except OSError as err:
            raise OSError(f"{caller}: could not download {url} ({err}); download it by hand into {dest.parent} or "
                          "check the network") from err
        got = file_md5(Path(tmp))
        if got != md5:
            raise ValueError(f"{caller}: {url} has md5 {got} but the official {dest.name} has md5 {md5}; the "
                             "download is corrupt or not the official release (nothing was kept)")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def split_samplers(caller: str, splits: dict[SplitName, ImageSplit], *, ways: int, shots: int, queries: int,
                   device: torch.device | str | None) -> dict[str, EpisodeSampler]:
    """One :class:`EpisodeSampler` per split (no rotations: images are returned as floats in ``[0, 1]``)."""
    samplers: dict[str, EpisodeSampler] = {}
    for name, data in splits.items():
        try:
            samplers[name] = EpisodeSampler(data.images, data.labels, ways=ways, shots=shots, queries=queries,
                                            device=device)
        except ValueError as err:
            raise ValueError(f"{caller}: the {name!r} split ({data.num_classes} classes): {err}") from err
    return samplers
