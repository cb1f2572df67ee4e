"""Omniglot (Lake et al., Science 2015) from the official release zips, decoded once and cached as one tensor.

The official zips (https://github.com/brendenlake/omniglot, folder ``python/``) hold 105x105 black-on-white PNGs laid
out as ``<zip name>/<Alphabet>/characterNN/<id>_<drawer>.png``. :func:`load_omniglot` reads them straight from the
zips (nothing is extracted), decodes with Pillow, inverts (stroke 1, background 0), resizes to ``image_size`` with
Pillow's BOX filter (an area average: anti-aliased, no ringing) and caches the result as ONE ``uint8`` tensor file,
written atomically and keyed by the zips' md5s and the image size; later loads read the cache (``weights_only``).

Two releases (``variant``):

* ``"small"``: ``images_background_small1.zip`` + ``images_background_small2.zip``, 8 alphabets. Greek and Latin are
  in both zips (byte-identical drawings); the union is deduplicated by ``Alphabet/characterNN``: 242 characters.
* ``"full"``: ``images_background.zip`` (30 alphabets, 964 characters) + ``images_evaluation.zip`` (20 alphabets, 659
  characters): 1623 characters.

Classes (characters) are numbered in a fixed order: zip by zip in the order above, alphabets sorted by name, then
characters sorted by name; a character seen in an earlier zip is skipped. :func:`omniglot_splits` splits classes
by alphabet (test alphabets never seen in training) or by the 1200/423 character split of Vinyals et al. / MAML.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path, PurePosixPath
from typing import Literal, NamedTuple, Sequence

import torch
from torch import Tensor

from metafunc._shared import save_atomic
from metafunc.data._benchmark import SamplerSpec, check_episode_counts, download_checked, file_md5, lazy_samplers
from metafunc.data.episodes import SplitSamplers

__all__ = [
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

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
"""Where :func:`download_omniglot` fetches ``<name>.zip`` from."""

OMNIGLOT_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1": "e704a628b5459e08445c13499850abc4",
    "images_background_small2": "b75a71a51d3b13f821f212756fe481fd",
}
"""md5 of each official zip (the file is ``<name>.zip``)."""

OMNIGLOT_VARIANTS = {
    "small": ("images_background_small1", "images_background_small2"),
    "full": ("images_background", "images_evaluation"),
}
"""The zips each ``variant`` reads, in class-numbering order."""

DEFAULT_TEST_ALPHABETS = ("Korean", "Sanskrit")
"""Held-out alphabets of the default split of the small release (82 characters)."""

VINYALS_TRAIN_CHARACTERS = 1200
"""Characters for meta-training (validation included) in the Vinyals et al. / MAML split of the full release."""

_CACHE_VERSION = 1
_RESAMPLE = "box"


class Omniglot(NamedTuple):
    """Decoded Omniglot: ``images`` uint8 ``(N, H, W)`` with stroke 255 and background 0, ``labels`` int64 ``(N,)``
    class ids into ``characters`` (``"Alphabet/characterNN"``, one per class).

    Example:
        >>> data = load_omniglot("shared/data/omniglot")  # doctest: +SKIP
        >>> data.images.shape, len(data.characters)  # doctest: +SKIP
        (torch.Size([4840, 28, 28]), 242)
    """

    images: Tensor
    labels: Tensor
    characters: list[str]

    @property
    def alphabets(self) -> list[str]:
        """The alphabet of each class."""
        return [c.split("/")[0] for c in self.characters]

    @property
    def num_classes(self) -> int:
        """Number of characters."""
        return len(self.characters)


def _check_variant(caller: str, variant: str) -> tuple[str, ...]:
    if variant not in OMNIGLOT_VARIANTS:
        raise ValueError(f"{caller}: variant must be 'small' or 'full' (got {variant!r})")
    return OMNIGLOT_VARIANTS[variant]


def _download_zips(caller: str, root: Path, names: Sequence[str], base_url: str, progress: bool) -> list[Path]:
    """Each ``<name>.zip`` in ``root``, downloaded unless a file with the official md5 is there already."""
    paths = []
    for name in names:
        path = root / f"{name}.zip"
        if not (path.is_file() and file_md5(path) == OMNIGLOT_MD5[name]):
            download_checked(caller, f"{base_url.rstrip('/')}/{name}.zip", path, OMNIGLOT_MD5[name],
                             progress=progress)
        paths.append(path)
    return paths


def download_omniglot(root: str | os.PathLike, *, variant: Literal["small", "full"] = "small",
                      base_url: str = OMNIGLOT_URL, progress: bool = True) -> list[Path]:
    """Download the official zips of ``variant`` (see :data:`OMNIGLOT_VARIANTS`) into ``root`` from ``base_url``
    (default: the ``python/`` folder of github.com/brendenlake/omniglot), checking each md5.

    A zip already in ``root`` with its official md5 (:data:`OMNIGLOT_MD5`) is not fetched again; any other file of
    that name is replaced by the official one. Each zip is written to a temporary file in ``root``, its md5
    checked, and only then renamed into place (``os.replace``): an interrupted or corrupt download never leaves a
    zip behind, and a wrong md5 is a ``ValueError`` naming the file and both md5s. ``progress`` shows the bytes
    received on stderr. A network failure is an ``OSError`` naming the URL; the fix is to copy the zips into
    ``root`` by hand. Returns the paths of the zips.

    Example:
        >>> download_omniglot("~/data/omniglot", variant="full")  # doctest: +SKIP
        [PosixPath('.../images_background.zip'), PosixPath('.../images_evaluation.zip')]
    """
    caller = "download_omniglot"
    names = _check_variant(caller, variant)
    if not isinstance(base_url, str) or not base_url:
        raise TypeError(f"{caller}: base_url must be a URL string (got {base_url!r})")
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"{caller}: root must be a path (got {type(root).__name__})")
    if not isinstance(progress, bool):
        raise TypeError(f"{caller}: progress must be a bool (got {progress!r})")
    return _download_zips(caller, Path(root).expanduser(), names, base_url, progress)


def _safe_member(caller: str, zip_path: Path, name: str) -> PurePosixPath:
    """The member's path, refusing names that would escape a folder they were extracted to."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise ValueError(
            f"{caller}: {zip_path.name} holds the entry {name!r}, whose path escapes the data folder; refusing "
            "this zip (it is not the official release)"
        )
    return p


def _decode(caller: str, zip_path: Path, member: str, raw: bytes, size: int) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as opened:
            im: Image.Image = opened.convert("L")
            im = Image.eval(im, lambda v: 255 - v)  # strokes (black, 0) become 255
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BOX)
            data = im.tobytes()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{caller}: cannot decode {member!r} in {zip_path} ({err}); the zip is corrupt") from err
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(size, size)


def _read_zip(caller: str, zip_path: Path, size: int, seen: set[str]
              ) -> tuple[list[Tensor], list[str], list[str]]:
    """Decode every new character of one zip: (images, character of each image, new characters in order)."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as err:
        raise ValueError(
            f"{caller}: {zip_path} is not a valid zip file ({err}); it is corrupt or truncated: delete it and "
            "download it again"
        ) from err
    with archive:
        groups: dict[str, list[str]] = {}
        for info in archive.infolist():
            p = _safe_member(caller, zip_path, info.filename)
            if info.is_dir() or p.suffix.lower() != ".png" or any(part.startswith(".") or part == "__MACOSX"
                                                                 for part in p.parts):
                continue
            if len(p.parts) != 4:
                raise ValueError(
                    f"{caller}: unexpected entry {info.filename!r} in {zip_path.name}; the official layout is "
                    "<split>/<Alphabet>/characterNN/<id>_<drawer>.png"
                )
            groups.setdefault(f"{p.parts[1]}/{p.parts[2]}", []).append(info.filename)
        if not groups:
            raise ValueError(f"{caller}: {zip_path} holds no PNG images in the official layout "
                             "<split>/<Alphabet>/characterNN/<id>_<drawer>.png")
        images, owners, new = [], [], []
        for character in sorted(groups, key=lambda c: tuple(c.split("/"))):
            if character in seen:
                continue
            seen.add(character)
            new.append(character)
            for member in sorted(groups[character]):
                try:
                    raw = archive.read(member)
                except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile) as err:
                    raise ValueError(f"{caller}: cannot read {member!r} from {zip_path} ({err}); the zip is corrupt "
                                     "or truncated: delete it and download it again") from err
                images.append(_decode(caller, zip_path, member, raw, size))
                owners.append(character)
    return images, owners, new


def _default_cache_dir() -> Path:
    return Path(os.environ.get("METAFUNC_CACHE", Path.home() / ".cache" / "metafunc")).expanduser()


def load_omniglot(
    root: str | os.PathLike,
    *,
    variant: Literal["small", "full"] = "small",
    image_size: int = 28,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    check_md5: bool = True,
) -> Omniglot:
    """Load the Omniglot ``variant`` from the official zips in ``root`` as one ``uint8`` tensor.

    ``root`` holds the zips of ``variant`` (see :data:`OMNIGLOT_VARIANTS`); ``download=True`` fetches the missing
    ones (and those with a wrong md5, unless ``check_md5=False``) as :func:`download_omniglot` does. Each zip's md5
    is checked against :data:`OMNIGLOT_MD5` (``check_md5=False`` to read other zips with the same layout). The
    decoded set is cached in ``cache_dir`` (default ``$METAFUNC_CACHE`` or ``~/.cache/metafunc``) as
    ``omniglot-<variant>-<size>-<key>.pt``, the key hashing the zips' md5s, the image size and the decoding; a
    second call loads the cache in well under a second.

    Example:
        >>> data = load_omniglot("shared/data/omniglot", variant="small")  # doctest: +SKIP
        >>> data.images.shape, data.images.dtype, len(data.characters)  # doctest: +SKIP
        (torch.Size([4840, 28, 28]), torch.uint8, 242)
    """
    caller = "load_omniglot"
    names = _check_variant(caller, variant)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"{caller}: image_size must be a positive int (got {image_size!r})")
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"{caller}: root must be a path (got {type(root).__name__})")
    root = Path(root).expanduser()
    if download:  # with check_md5=False, zips that are there (maybe not the official ones) are kept
        wanted = names if check_md5 else [n for n in names if not (root / f"{n}.zip").is_file()]
        _download_zips("download_omniglot", root, wanted, OMNIGLOT_URL, progress=True)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{caller}: the data root {str(root)!r} does not exist or is not a folder; pass the folder holding "
            f"{', '.join(n + '.zip' for n in names)} (or download=True)"
        )
    paths = [root / f"{n}.zip" for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{caller}: {root} lacks {', '.join(missing)} (variant={variant!r}); copy the official zips there, "
            "pass download=True, or choose the other variant"
        )
    md5s = []
    for name, path in zip(names, paths):
        got = file_md5(path)
        if check_md5 and got != OMNIGLOT_MD5[name]:
            raise ValueError(
                f"{caller}: {path} has md5 {got} but the official {name}.zip has md5 {OMNIGLOT_MD5[name]}; the "
                "file is corrupt, truncated or not the official release: delete it and download it again "
                "(or pass check_md5=False to read it anyway)"
            )
        md5s.append(got)
    key = hashlib.sha1(f"v{_CACHE_VERSION}|{_RESAMPLE}|{image_size}|{'|'.join(md5s)}".encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    cache_file = cache / f"omniglot-{variant}-{image_size}-{key}.pt"
    if cache_file.is_file():
        try:
            blob = torch.load(cache_file, weights_only=True, map_location="cpu")
            return Omniglot(blob["images"], blob["labels"], list(blob["characters"]))
        except Exception:  # a damaged cache is rebuilt below
            pass
    images: list[Tensor] = []
    owners: list[str] = []
    characters: list[str] = []
    seen: set[str] = set()
    for path in paths:
        imgs, own, new = _read_zip(caller, path, image_size, seen)
        images += imgs
        owners += own
        characters += new
    index = {c: i for i, c in enumerate(characters)}
    data = Omniglot(torch.stack(images), torch.tensor([index[c] for c in owners], dtype=torch.int64), characters)
    try:
        save_atomic({"images": data.images, "labels": data.labels, "characters": data.characters}, cache_file)
    except OSError:
        pass  # a read-only cache folder only costs speed
    return data


def omniglot_splits(
    data: Omniglot,
    *,
    split: Literal["alphabets", "vinyals"] = "alphabets",
    test_alphabets: Sequence[str] = DEFAULT_TEST_ALPHABETS,
    val_characters: int | None = None,
    seed: int = 0,
) -> dict[str, list[int]]:
    """Class ids (characters) of the ``"train"``, ``"val"`` and ``"test"`` splits.

    * ``split="alphabets"``: every character of ``test_alphabets`` is a test class; the other alphabets' characters
      are train classes, of which ``val_characters`` are held out for validation.
    * ``split="vinyals"`` (full release): the first :data:`VINYALS_TRAIN_CHARACTERS` (1200) classes in the loader's
      order (all 964 of ``images_background`` then the first 236 of ``images_evaluation``, alphabets and characters
      sorted by name) are train classes, of which ``val_characters`` are held out for validation; the last 423 are
      test classes. ``test_alphabets`` is ignored.

    Validation characters are drawn at random with ``seed`` (default ``val_characters``: 10% of the train classes,
    at least 20 so that 20-way validation works). Returns sorted lists.

    Example:
        >>> splits = omniglot_splits(load_omniglot("shared/data/omniglot"))  # doctest: +SKIP
        >>> {k: len(v) for k, v in splits.items()}  # doctest: +SKIP
        {'train': 140, 'val': 20, 'test': 82}
    """
    caller = "omniglot_splits"
    if not isinstance(data, Omniglot):
        raise TypeError(f"{caller}: data must be an Omniglot from load_omniglot (got {type(data).__name__})")
    if split not in ("alphabets", "vinyals"):
        raise ValueError(f"{caller}: split must be 'alphabets' or 'vinyals' (got {split!r})")
    n = data.num_classes
    if split == "alphabets":
        if isinstance(test_alphabets, str) or not all(isinstance(a, str) for a in test_alphabets):
            raise TypeError(f"{caller}: test_alphabets must be a sequence of alphabet names (got {test_alphabets!r})")
        known = sorted(set(data.alphabets))
        unknown = [a for a in test_alphabets if a not in known]
        if unknown:
            raise ValueError(f"{caller}: test_alphabets {unknown} are not in this data set; its alphabets are {known}")
        held = set(test_alphabets)
        test = [i for i, a in enumerate(data.alphabets) if a in held]
        train = [i for i, a in enumerate(data.alphabets) if a not in held]
        if not test or not train:
            raise ValueError(f"{caller}: test_alphabets {list(test_alphabets)} leave "
                             f"{len(train)} train and {len(test)} test characters; both need some")
    else:
        if n <= VINYALS_TRAIN_CHARACTERS:
            raise ValueError(f"{caller}: split='vinyals' needs the full release (1623 characters, variant='full'); "
                             f"this data set has {n}")
        train = list(range(VINYALS_TRAIN_CHARACTERS))
        test = list(range(VINYALS_TRAIN_CHARACTERS, n))
    if val_characters is None:
        val_characters = max(20, round(0.1 * len(train)))
    if isinstance(val_characters, bool) or not isinstance(val_characters, int) or not 0 <= val_characters < len(train):
        raise ValueError(f"{caller}: val_characters must be an int in [0, {len(train) - 1}] (got {val_characters!r})")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(train[i] for i in perm[:val_characters])
    train = sorted(train[i] for i in perm[val_characters:])
    return {"train": train, "val": val, "test": sorted(test)}


def omniglot_samplers(
    root: str | os.PathLike,
    *,
    ways: int,
    shots: int,
    queries: int,
    device: torch.device | str | None = None,
    test_alphabets: Sequence[str] = DEFAULT_TEST_ALPHABETS,
    seed: int = 0,
    variant: Literal["small", "full"] = "small",
    split: Literal["alphabets", "vinyals"] = "alphabets",
    val_characters: int | None = None,
    image_size: int = 28,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    val_ways: int | None = None,
) -> SplitSamplers:
    """Episode samplers for Omniglot's ``"train"``, ``"val"`` and ``"test"`` splits, the data on ``device``.

    Loads (or reads the cache of) :func:`load_omniglot`, splits the characters with :func:`omniglot_splits`
    (``seed`` picks the validation characters) and returns a :class:`~metafunc.data.SplitSamplers`: one
    :class:`~metafunc.data.EpisodeSampler` per split, each built (copied to ``device`` and checked against its ways)
    when first read, so one split's size never caps another's ways. ``"train"`` uses rotations by 0/90/180/270
    degrees as extra classes (the MAML protocol); ``"val"`` and ``"test"`` do not. ``"train"`` and ``"test"`` are
    ``ways``-way; ``"val"`` is ``val_ways``-way (default: ``ways``, or all of its characters when it has fewer, as
    when training 60-way with 20 validation characters; ``samplers.ways["val"]`` says which).
    ``sample(meta_batch, generator)`` gives float images (1 = stroke, 0 = background) of shape
    ``(meta_batch, ways * shots, 1, image_size, image_size)`` and int64 labels ``0..ways-1`` shuffled per task.

    Example:
        >>> samplers = omniglot_samplers("shared/data/omniglot", ways=60, shots=5, queries=5)  # doctest: +SKIP
        >>> samplers.ways  # doctest: +SKIP
        {'train': 60, 'val': 20, 'test': 60}
        >>> task = samplers["train"].sample(32, torch.Generator().manual_seed(0))  # doctest: +SKIP
        >>> task.support_x.shape  # doctest: +SKIP
        torch.Size([32, 300, 1, 28, 28])
    """
    caller = "omniglot_samplers"
    check_episode_counts(caller, ways=ways, shots=shots, queries=queries, val_ways=val_ways)
    data = load_omniglot(root, variant=variant, image_size=image_size, cache_dir=cache_dir, download=download)
    splits = omniglot_splits(data, split=split, test_alphabets=test_alphabets, val_characters=val_characters,
                             seed=seed)
    specs = {}
    for name, classes in splits.items():
        keep = torch.zeros(data.num_classes, dtype=torch.bool)
        keep[classes] = True
        mask = keep[data.labels]
        rotations = name == "train"
        described = f"{len(classes)} characters of 20 drawings{', x4 with rotations' if rotations else ''}"
        specs[name] = SamplerSpec(data.images[mask].unsqueeze(1), data.labels[mask], described, rotations)
    return lazy_samplers(caller, specs, ways=ways, shots=shots, queries=queries, device=device,
                         val_ways=val_ways)
