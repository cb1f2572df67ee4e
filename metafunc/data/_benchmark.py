"""What the image benchmarks (:mod:`metafunc.data.cifar`, :mod:`metafunc.data.mini_imagenet`) share: the decoded
split (:class:`ImageSplit`), file fingerprints, a pickle reader that only builds numpy arrays and plain containers,
Pillow decoding into a preallocated ``uint8`` tensor, the one-file cache, md5-checked downloads with progress, and
the lazily built samplers of the three splits (Omniglot's too)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Literal, Mapping, NamedTuple, Sequence, TextIO

import torch
from torch import Tensor

from metafunc._shared import check_steps, file_mode, save_atomic
from metafunc.data.episodes import EpisodeSampler, SplitSamplers, check_class_sizes

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
    "DownloadProgress",
    "SamplerSpec",
    "check_episode_counts",
    "lazy_samplers",
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


class DownloadProgress:
    """Shows how much of a download has arrived on ``stream`` (default ``sys.stderr``): on a terminal one line
    rewritten in place at most every ``interval`` seconds, elsewhere (a log) a line at each quarter of the file.
    Call it as ``progress(done_bytes, total_bytes_or_None)``; :meth:`close` ends the line.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> progress = DownloadProgress("images_background.zip", stream=out)
        >>> for done in (0, 4 << 20, 8 << 20):
        ...     progress(done, 8 << 20)
        >>> progress.close()
        >>> print(out.getvalue(), end="")
        images_background.zip: 0.0 / 8.4 MB (0%)
        images_background.zip: 4.2 / 8.4 MB (50%)
        images_background.zip: 8.4 / 8.4 MB (100%)
    """

    def __init__(self, label: str, *, stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_time = -float("inf")
        self._last_quarter = -1
        self._line = ""
        self._shown = ""

    def _text(self, done: int, total: int | None) -> str:
        if total:
            return f"{self.label}: {done / 1e6:.1f} / {total / 1e6:.1f} MB ({100 * done // total}%)"
        return f"{self.label}: {done / 1e6:.1f} MB"

    def __call__(self, done: int, total: int | None) -> None:
        self._line = self._text(done, total)
        if self._tty:
            now = time.monotonic()
            if now - self._last_time >= self.interval or (total and done >= total):
                self._last_time = now
                self._write("\r" + self._line)
            return
        quarter = 4 * done // total if total else (0 if done == 0 else -1)
        if quarter > self._last_quarter:
            self._last_quarter = quarter
            self._write(self._line + "\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
        self._shown = self._line

    def close(self) -> None:
        """Show the final state if it is not shown yet, and end the line."""
        if self._tty and self._line:
            self._write(("" if self._line == self._shown else "\r" + self._line) + "\n")
        elif self._line != self._shown:
            self._write(self._line + "\n")


def _fetch(url: str, dest: Path, progress: Callable[[int, int | None], None] | None = None) -> None:
    """Copy ``url`` to the file ``dest``, calling ``progress(done, total)`` as bytes arrive; replaced in tests."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        done = 0
        if progress is not None:
            progress(done, total)
        while chunk := response.read(1 << 16):
            out.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        if total is not None and done < total:  # urllib returns a short body without an error
            raise ConnectionError(f"the transfer stopped after {done} of {total} bytes")
        out.flush()
        os.fsync(out.fileno())


def download_checked(caller: str, url: str, dest: Path, md5: str, *, progress: bool = False) -> Path:
    """Fetch ``url`` into a temporary file beside ``dest``, check its md5, and only then rename it to ``dest``; an
    interrupted or wrong download leaves nothing behind. ``progress=True`` shows a :class:`DownloadProgress` on
    stderr. A network failure is an ``OSError`` naming ``url`` and the fix (copy the file into ``dest``'s folder by
    hand)."""
    import http.client

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.fchmod(fd, file_mode())
    os.close(fd)
    try:
        shown = DownloadProgress(dest.name) if progress else None
        try:
            if shown is None:
                _fetch(url, Path(tmp))
            else:
                _fetch(url, Path(tmp), shown)
        except (OSError, http.client.HTTPException) as err:
            raise OSError(f"{caller}: could not download {url} ({type(err).__name__}: {err}); check the network, or "
                          f"download {dest.name} by hand (from {url}) and copy it into {dest.parent}") from err
        finally:
            if shown is not None:
                shown.close()
        got = file_md5(Path(tmp))
        if got != md5:
            raise ValueError(f"{caller}: {url} has md5 {got} but the official {dest.name} has md5 {md5}; the "
                             "download is corrupt or not the official release (nothing was kept)")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


class SamplerSpec(NamedTuple):
    """What :func:`lazy_samplers` needs to build one split's :class:`EpisodeSampler`: the split's ``images`` and
    ``labels``, a ``description`` for its errors (``"20 characters of 20 drawings"``) and whether rotated copies are
    extra classes (``rotations``).

    Example:
        >>> spec = SamplerSpec(torch.rand(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]), "3 classes")
        >>> spec.rotations
        False
    """

    images: Tensor
    labels: Tensor
    description: str
    rotations: bool = False


def check_episode_counts(caller: str, *, ways: int, shots: int, queries: int, val_ways: int | None) -> None:
    """``ways``, ``shots``, ``queries`` (ints >= 1) and ``val_ways`` (``None`` or an int >= 1), checked before any
    data is loaded."""
    for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
        check_steps(caller, name, value)
    if val_ways is not None:
        check_steps(caller, "val_ways", val_ways)


def _val_ways(caller: str, val_ways: int | None, ways: int, spec: SamplerSpec, classes: int) -> int:
    if val_ways is None:
        return min(ways, classes)
    if val_ways > classes:
        raise ValueError(
            f"{caller}: val_ways = {val_ways} but the 'val' split ({spec.description}) has only {classes} classes; "
            f"pass val_ways <= {classes}, or val_ways=None to validate at min(ways, {classes})-way"
        )
    return val_ways


def lazy_samplers(caller: str, specs: Mapping[str, SamplerSpec], *, ways: int, shots: int, queries: int,
                  device: torch.device | str | None, val_ways: int | None = None) -> SplitSamplers:
    """A :class:`SplitSamplers` whose ``split`` sampler is built from ``specs[split]`` on first use, so no split's
    size caps another's ways. ``"val"`` runs at ``val_ways`` (default: ``ways``, or all of the val split's classes
    when it has fewer); every other split at ``ways``. Checked now: the counts, an explicit ``val_ways`` against the
    val split, and ``shots + queries`` against every split's smallest class; ``ways`` is checked against a split
    when it is built.

    Example:
        >>> specs = {"train": SamplerSpec(torch.rand(40, 4), torch.arange(40) % 8, "8 classes"),
        ...          "val": SamplerSpec(torch.rand(12, 4), torch.arange(12) % 3, "3 classes")}
        >>> samplers = lazy_samplers("demo", specs, ways=5, shots=1, queries=2, device=None)
        >>> samplers.ways, samplers.built
        ({'train': 5, 'val': 3}, ())
        >>> samplers["val"].ways, samplers.built
        (3, ('val',))
    """
    check_episode_counts(caller, ways=ways, shots=shots, queries=queries, val_ways=val_ways)
    split_ways, num_classes = {}, {}
    for name, spec in specs.items():
        if spec.labels.numel() == 0:  # an empty split (e.g. no validation characters) raises if it is ever used
            num_classes[name], split_ways[name] = 0, (val_ways or ways) if name == "val" else ways
            continue
        try:
            base = int(check_class_sizes(spec.labels, shots=shots, queries=queries)[0].numel())
        except ValueError as err:
            raise ValueError(f"{caller}: the {name!r} split ({spec.description}): {err}") from err
        num_classes[name] = base * (4 if spec.rotations else 1)
        split_ways[name] = _val_ways(caller, val_ways, ways, spec, num_classes[name]) if name == "val" else ways

    def builder(name: str, spec: SamplerSpec) -> Callable[[], EpisodeSampler]:
        def build() -> EpisodeSampler:
            try:
                return EpisodeSampler(spec.images, spec.labels, ways=split_ways[name], shots=shots, queries=queries,
                                      rotations=spec.rotations, device=device)
            except ValueError as err:
                raise ValueError(f"{caller}: the {name!r} split ({spec.description}): {err}") from err
        return build

    return SplitSamplers({name: builder(name, spec) for name, spec in specs.items()}, ways=split_ways,
                         num_classes=num_classes)


def split_samplers(caller: str, splits: Mapping[SplitName, ImageSplit], *, ways: int, shots: int, queries: int,
                   device: torch.device | str | None, val_ways: int | None = None) -> SplitSamplers:
    """:func:`lazy_samplers` over image splits (no rotations: images are returned as floats in ``[0, 1]``)."""
    specs: dict[str, SamplerSpec] = {name: SamplerSpec(data.images, data.labels, f"{data.num_classes} classes")
             for name, data in splits.items()}
    return lazy_samplers(caller, specs, ways=ways, shots=shots, queries=queries, device=device, val_ways=val_ways)
