"""CIFAR-FS, FC100, miniImageNet and tieredImageNet from small files in the exact distributed formats: the shipped
split lists, splits and label maps, shapes, the cache (written once, reused, rebuilt when the source changes), md5
and download, and one refusal per kind of malformed file."""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import io
import os
import pickle
import pickletools
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import metafunc.data._benchmark as benchmark_module
import metafunc.data.cifar as cifar_module
import metafunc.data.mini_imagenet as mini_module
from metafunc.data import (
    CIFAR100_MD5,
    CIFAR_FS_CLASSES,
    FC100_SUPERCLASSES,
    MINI_IMAGENET_PICKLES,
    cifar_fs_samplers,
    download_cifar100,
    fc100_samplers,
    load_cifar_fs,
    load_fc100,
    load_mini_imagenet,
    load_tiered_imagenet,
    mini_imagenet_samplers,
    tiered_imagenet_samplers,
)

ROOT = Path(__file__).resolve().parents[1]

# CIFAR-100's meta, in label order: b"fine_label_names" (100, alphabetical) and b"coarse_label_names" (20).
FINE_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle "
    "caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant "
    "flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man "
    "maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail "
    "snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout "
    "tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
COARSE_NAMES = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
    "household_furniture insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes "
    "large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles small_mammals trees "
    "vehicles_1 vehicles_2"
).split()
SUPERCLASSES = {
    "aquatic_mammals": "beaver dolphin otter seal whale", "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip", "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe", "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk", "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman", "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train", "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}
COARSE_OF = {f: COARSE_NAMES.index(c) for c, fs in SUPERCLASSES.items() for f in fs.split()}
# Oreshkin et al.'s TADAM code: class_split = {'train': {1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19}, 'val': {8, 11, 13,
# 16}, 'test': {0, 7, 12, 14}} (coarse label ids).
TADAM_SPLIT = {"train": {1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19}, "val": {8, 11, 13, 16}, "test": {0, 7, 12, 14}}
# Bertinetto et al.'s published CIFAR-FS split: github.com/bertinetto/r2d2, cifar-fs_splits/{train,val,test}.txt
# (commit 9ed0090, "added cifar-fs splits"), the files their CIFAR-FS download holds as
# data/cifar-fs/splits/bertinetto/*.txt. Copied here from those files, not from metafunc's.
CIFAR_FS_TRAIN = {
    "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus", "can", "castle", "caterpillar",
    "chair", "clock", "cloud", "cockroach", "couch", "cup", "dinosaur", "dolphin", "elephant", "forest", "girl",
    "hamster", "house", "kangaroo", "keyboard", "lawn_mower", "lion", "lizard", "lobster", "mountain", "mouse",
    "mushroom", "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper", "snake", "spider", "squirrel",
    "streetcar", "sunflower", "tank", "tiger", "train", "trout", "tulip", "turtle", "willow_tree", "wolf"}
CIFAR_FS_VAL = {"beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish", "lamp", "maple_tree",
                "motorcycle", "otter", "sea", "shark", "television", "tractor"}
CIFAR_FS_TEST = {"baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy",
                 "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm"}


# ------------------------------------------------------------------------------------------ the shipped splits


def test_cifar_fs_split_lists():
    counts = {s: len(CIFAR_FS_CLASSES[s]) for s in ("train", "val", "test")}
    assert counts == {"train": 64, "val": 16, "test": 20}
    sets = {s: set(v) for s, v in CIFAR_FS_CLASSES.items()}
    assert all(len(sets[s]) == counts[s] for s in sets)                       # no name twice
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(FINE_NAMES)      # every CIFAR-100 class, once
    assert sets == {"train": CIFAR_FS_TRAIN, "val": CIFAR_FS_VAL, "test": CIFAR_FS_TEST}    # the published split
    # the shipped files list each split in CIFAR-100's (alphabetical) label order, one name per line
    assert all(list(CIFAR_FS_CLASSES[s]) == sorted(sets[s]) for s in sets)


def test_fc100_split_lists():
    sets = {s: set(v) for s, v in FC100_SUPERCLASSES.items()}
    assert {s: len(v) for s, v in sets.items()} == {"train": 12, "val": 4, "test": 4}
    assert sets["train"] | sets["val"] | sets["test"] == set(COARSE_NAMES)
    assert {s: {COARSE_NAMES.index(c) for c in v} for s, v in sets.items()} == TADAM_SPLIT
    classes = {s: {f for c in v for f in SUPERCLASSES[c].split()} for s, v in sets.items()}
    assert {s: len(v) for s, v in classes.items()} == {"train": 60, "val": 20, "test": 20}
    assert len(FINE_NAMES) == 100 == len(set(COARSE_OF)) and sorted(FINE_NAMES) == FINE_NAMES


def test_split_files_ship_with_the_package():
    folder = importlib.resources.files("metafunc.data").joinpath("splits")
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".txt"))
    assert names == [f"{b}_{s}.txt" for b in ("cifar_fs", "fc100") for s in ("test", "train", "val")]
    assert '"data/splits/*.txt"' in (ROOT / "pyproject.toml").read_text()


# ----------------------------------------------------------------------------------------- a fake CIFAR-100


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote the CIFAR-100 release and Ren et al.'s tieredImageNet files: every
    ``str`` (dict keys, class names, numpy's dtype codes and the raw bytes of each array) is a byte string written with
    SHORT_BINSTRING or BINSTRING, and numpy lives in ``numpy.core``. Python 3's own protocol 2 writes bytes as a
    ``_codecs.encode`` call on text instead, which loads as bytes under any ``encoding=``, so it cannot tell whether
    a loader passes ``encoding="bytes"``; these opcodes can (Python 3 decodes them as ASCII text otherwise)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("utf-8") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def _py2_pickle(obj) -> bytes:
    """``obj`` pickled as Python 2's cPickle would have (:class:`_Python2Pickler`)."""
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def cifar_blobs(per_class=(3, 1)) -> dict[str, dict]:
    """The three pickled dicts of the release with ``per_class`` (train, test) images per class. Pixel planes:
    red = fine label, green = 10 * coarse label, blue = 100 * part (0 train, 1 test) + index within the class."""
    blobs = {"meta": {b"fine_label_names": [n.encode() for n in FINE_NAMES],
                      b"coarse_label_names": [n.encode() for n in COARSE_NAMES]}}
    for part, count in zip(("train", "test"), per_class):
        rows, fine, coarse = [], [], []
        for j in range(count):
            for f, name in enumerate(FINE_NAMES):
                row = np.empty((3, 1024), dtype=np.uint8)
                row[0], row[1], row[2] = f, 10 * COARSE_OF[name], 100 * (part == "test") + j
                rows.append(row.reshape(-1))
                fine.append(f)
                coarse.append(COARSE_OF[name])
        blobs[part] = {b"batch_label": f"{part}ing batch 1 of 1".encode(), b"fine_labels": fine,
                       b"coarse_labels": coarse, b"filenames": [b"x.png"] * len(fine), b"data": np.stack(rows)}
    return blobs


def write_tarball(path: Path, blobs: dict | None = None, *, extra: dict[str, bytes] | None = None,
                  skip: tuple[str, ...] = (), raw: dict[str, bytes] | None = None) -> Path:
    blobs = cifar_blobs() if blobs is None else blobs
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("cifar-100-python")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        entries = {"cifar-100-python/file.txt~": b""}
        entries.update({f"cifar-100-python/{k}": _py2_pickle(v) for k, v in blobs.items() if k not in skip})
        entries.update(raw or {})
        entries.update(extra or {})
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_tarball(root / "cifar-100-python.tar.gz")
    return root


def test_the_fake_files_are_python2_pickles_and_are_read_as_such(tmp_path):
    """The real CIFAR-100 and tieredImageNet pickles come from Python 2: their ``str`` keys, names and numpy's raw array
    bytes are SHORT_BINSTRING / BINSTRING opcodes, which only ``encoding="bytes"`` reads back as bytes (Python 3's
    default decodes them as ASCII and fails on the first pixel over 127). The fixtures hold exactly those opcodes."""
    blob = cifar_blobs(per_class=(1, 1))["train"]
    raw = _py2_pickle(blob)
    ops = {op.name for op, _, _ in pickletools.genops(raw)}
    assert {"SHORT_BINSTRING", "BINSTRING"} <= ops                          # keys and the (100, 3072) pixel string
    assert not ops & {"BINUNICODE", "SHORT_BINUNICODE", "BINBYTES", "SHORT_BINBYTES"}
    assert b"_codecs" not in raw and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    assert int(blob[b"data"].max()) > 127                                   # not ASCII: a text decoding fails
    loaded = benchmark_module.restricted_load("t", io.BytesIO(raw), "train", "fix")
    assert sorted(loaded) == sorted(blob) and all(isinstance(k, bytes) for k in loaded)
    assert loaded[b"data"].dtype == np.uint8 and np.array_equal(loaded[b"data"], blob[b"data"])
    assert loaded[b"fine_labels"] == blob[b"fine_labels"] and loaded[b"batch_label"] == b"training batch 1 of 1"
    root = write_tiered(tmp_path, "test", 3)
    for name in ("test_images_png.pkl", "test_labels.pkl"):
        ops = {op.name for op, _, _ in pickletools.genops((root / name).read_bytes())}
        assert "SHORT_BINSTRING" in ops and not ops & {"BINUNICODE", "BINBYTES", "SHORT_BINBYTES"}, name
    images = benchmark_module.restricted_load("t", io.BytesIO((root / "test_images_png.pkl").read_bytes()), "x", "fix")
    assert bytes(images[0][:4]) == b"\x89PNG"                               # the PNG bytes, byte for byte


def test_cifar_fs_splits_labels_and_images(cifar_root, tmp_path):
    splits = {s: load_cifar_fs(cifar_root, s, cache_dir=tmp_path, check_md5=False) for s in ("train", "val", "test")}
    published = {"train": CIFAR_FS_TRAIN, "val": CIFAR_FS_VAL, "test": CIFAR_FS_TEST}
    for s, data in splits.items():
        n = len(published[s])
        assert data.class_names == sorted(published[s]) and data.num_classes == n
        assert data.images.shape == (4 * n, 3, 32, 32) and data.images.dtype == torch.uint8
        assert data.labels.dtype == torch.int64 and torch.equal(torch.bincount(data.labels), torch.full((n,), 4))
        # each image is its class's: red plane = fine label id, green = 10 * superclass id (CHW rows decoded)
        fine = data.images[:, 0, 0, 0].long()
        assert [FINE_NAMES[int(f)] for f in fine] == [data.class_names[int(y)] for y in data.labels]
        assert torch.equal(data.images[:, 1, 31, 31].long(),
                           torch.tensor([10 * COARSE_OF[FINE_NAMES[int(f)]] for f in fine]))
        assert bool((data.images[:, 0] == data.images[:, 0, :1, :1]).all())            # whole planes, not rows
        # train and test images pooled: three train images (blue 0, 1, 2) and one test image (100) per class
        assert sorted(data.images[data.labels == 0, 2, 0, 0].tolist()) == [0, 1, 2, 100]


def test_fc100_superclass_split(cifar_root, tmp_path):
    for s in ("train", "val", "test"):
        data = load_fc100(cifar_root, s, cache_dir=tmp_path, check_md5=False)
        want = sorted(f for c in FC100_SUPERCLASSES[s] for f in SUPERCLASSES[c].split())
        assert data.class_names == want and data.num_classes == {"train": 60, "val": 20, "test": 20}[s]
        assert sorted(set(data.labels.tolist())) == list(range(data.num_classes))
        supers = {COARSE_NAMES[int(g) // 10] for g in data.images[:, 1, 0, 0]}
        assert supers == set(FC100_SUPERCLASSES[s])


def test_cifar_cache_is_written_once_reused_and_rebuilt_when_the_tarball_changes(tmp_path, monkeypatch):
    root = tmp_path / "data"
    tarball = write_tarball(root / "cifar-100-python.tar.gz")
    cache = tmp_path / "cache"
    first = load_cifar_fs(root, "val", cache_dir=cache, check_md5=False)
    files = sorted(p.name for p in cache.glob("*.pt"))
    key = hashlib.sha1(f"v1|cifar_fs|{benchmark_module.file_md5(tarball)}".encode()).hexdigest()[:16]
    assert files == sorted(f"cifar_fs-{s}-{key}.pt" for s in ("train", "val", "test"))  # one pass, three files
    assert not list(cache.glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(cifar_module, "_decode", no_decoding)
    again = load_cifar_fs(root, "val", cache_dir=cache, check_md5=False)
    assert torch.equal(again.images, first.images) and again.class_names == first.class_names
    samplers = cifar_fs_samplers(root, ways=5, shots=1, queries=2, cache_dir=cache, check_md5=False)
    assert samplers["test"].num_classes == 20
    monkeypatch.undo()
    write_tarball(tarball, cifar_blobs(per_class=(2, 1)))                  # new content, new md5: rebuilt
    changed = load_cifar_fs(root, "val", cache_dir=cache, check_md5=False)
    assert changed.images.shape[0] == 3 * 16 and len(list(cache.glob("*.pt"))) == 6
    (new_val,) = set(cache.glob("cifar_fs-val-*.pt")) - {cache / files[2]}
    new_val.write_bytes(b"damaged")                                        # a damaged cache is rebuilt too
    assert torch.equal(load_cifar_fs(root, "val", cache_dir=cache, check_md5=False).images, changed.images)
    assert len(list(cache.glob("*.pt"))) == 6


def test_cifar_samplers(cifar_root, tmp_path):
    samplers = fc100_samplers(cifar_root, ways=5, shots=2, queries=2, cache_dir=tmp_path, check_md5=False)
    assert {k: v.num_classes for k, v in samplers.items()} == {"train": 60, "val": 20, "test": 20}
    assert not any(s.rotations for s in samplers.values())
    task = samplers["train"].sample(3, torch.Generator().manual_seed(0))
    assert task.support_x.shape == (3, 10, 3, 32, 32) and task.query_x.shape == (3, 10, 3, 32, 32)
    assert task.support_x.dtype == torch.float32 and 0 <= float(task.support_x.min()) <= float(task.support_x.max()) <= 1
    assert set(task.query_y.unique().tolist()) == set(range(5))
    # the images are [0, 1] floats of the uint8 data: red plane = fine label / 255
    data = load_fc100(cifar_root, "train", cache_dir=tmp_path, check_md5=False)
    assert {round(float(v) * 255) for v in task.support_x[:, :, 0, 0, 0].flatten()} <= set(
        data.images[:, 0, 0, 0].tolist())
    # 17-way: the val split's 16 classes cap only validation (16-way); nothing is built before it is read
    wide = cifar_fs_samplers(cifar_root, ways=17, shots=1, queries=1, cache_dir=tmp_path, check_md5=False)
    assert wide.ways == {"train": 17, "val": 16, "test": 17} and wide.built == ()
    assert wide["val"].sample(2, torch.Generator().manual_seed(0)).support_y.shape == (2, 16)
    assert wide["test"].sample(2, torch.Generator().manual_seed(0)).support_y.shape == (2, 17)
    assert wide.built == ("val", "test")
    with pytest.raises(ValueError, match=r"cifar_fs_samplers: val_ways = 17 but the 'val' split \(16 classes\) has only "
                                         r"16 classes; pass val_ways <= 16, or val_ways=None"):
        cifar_fs_samplers(cifar_root, ways=5, val_ways=17, shots=1, queries=1, cache_dir=tmp_path, check_md5=False)
    assert fc100_samplers(cifar_root, ways=5, val_ways=3, shots=1, queries=1, cache_dir=tmp_path,
                          check_md5=False).ways == {"train": 5, "val": 3, "test": 5}
    # 21-way: the test split's 20 classes refuse it when the test split is read
    too_wide = cifar_fs_samplers(cifar_root, ways=21, shots=1, queries=1, cache_dir=tmp_path, check_md5=False)
    with pytest.raises(ValueError, match=r"cifar_fs_samplers: the 'test' split \(20 classes\): EpisodeSampler: ways = "
                                         r"21 but the data set has only 20 classes"):
        too_wide["test"]
    assert too_wide["train"].ways == 21
    with pytest.raises(ValueError, match=r"shots \+ queries = 3 \+ 2 = 5 but some classes have only 4"):
        cifar_fs_samplers(cifar_root, ways=5, shots=3, queries=2, cache_dir=tmp_path, check_md5=False)


def test_cifar_md5_is_checked(cifar_root, tmp_path):
    with pytest.raises(ValueError, match=rf"load_cifar_fs: .*cifar-100-python.tar.gz has md5 [0-9a-f]{{32}} but the "
                                         rf"official cifar-100-python.tar.gz has md5 {CIFAR100_MD5}; .*check_md5=False"):
        load_cifar_fs(cifar_root, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.pt"))


def test_cifar_download_checks_md5_and_keeps_nothing_wrong(cifar_root, tmp_path, monkeypatch):
    server = tmp_path / "server" / "cifar-100-python.tar.gz"
    server.parent.mkdir()
    server.write_bytes((cifar_root / "cifar-100-python.tar.gz").read_bytes())
    with pytest.raises(ValueError, match=r"download_cifar100: file://.* has md5 [0-9a-f]{32} but the official "
                                         rf"cifar-100-python.tar.gz has md5 {CIFAR100_MD5}; .*nothing was kept"):
        download_cifar100(tmp_path / "dl", url=server.as_uri())
    assert os.listdir(tmp_path / "dl") == []
    with pytest.raises(OSError, match=r"download_cifar100: could not download file://.*missing.tar.gz"):
        download_cifar100(tmp_path / "dl", url=(tmp_path / "missing.tar.gz").as_uri())
    assert os.listdir(tmp_path / "dl") == []
    # with the fake's md5 standing in for the official one, the same file is downloaded, kept and loads (md5 checked)
    monkeypatch.setattr(cifar_module, "CIFAR100_MD5", benchmark_module.file_md5(server))
    path = download_cifar100(tmp_path / "dl", url=server.as_uri())
    assert path.read_bytes() == server.read_bytes() and os.listdir(tmp_path / "dl") == ["cifar-100-python.tar.gz"]
    assert load_cifar_fs(tmp_path / "dl", "test", cache_dir=tmp_path / "c").num_classes == 20
    # the default URL is the official one (unreachable here: the error names it)
    monkeypatch.setattr(benchmark_module, "_fetch", lambda url, dest: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(OSError, match=r"could not download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"):
        load_cifar_fs(tmp_path / "empty", download=True)


@pytest.mark.parametrize("member", ["../escape", "/abs/cifar-100-python/train", "cifar-100-python/../../x"])
def test_cifar_paths_escaping_the_folder_are_refused(tmp_path, member):
    root = tmp_path / "data"
    write_tarball(root / "cifar-100-python.tar.gz", extra={member: b"x"})
    with pytest.raises(ValueError, match="whose path escapes the data folder"):
        load_cifar_fs(root, cache_dir=tmp_path / "c", check_md5=False)


def test_cifar_link_member_is_refused(tmp_path):
    root = tmp_path / "data"
    blobs = cifar_blobs()
    path = root / "cifar-100-python.tar.gz"
    write_tarball(path, blobs, skip=("meta",))
    with tarfile.open(path, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    with tarfile.open(path, "w:gz") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
        link = tarfile.TarInfo("cifar-100-python/meta")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(ValueError, match=r"cifar-100-python/meta in cifar-100-python.tar.gz is not a regular file"):
        load_cifar_fs(root, cache_dir=tmp_path / "c", check_md5=False)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/metafunc-pwned",))


def _mutated(change):
    blobs = cifar_blobs(per_class=(1, 1))
    change(blobs)
    return blobs


CIFAR_MALFORMED = {
    "missing-member": (dict(skip=("meta",)), r"lacks cifar-100-python/meta; the official release holds"),
    "no-data-key": (dict(blobs=_mutated(lambda b: b["train"].pop(b"data"))),
                    r"cifar-100-python/train in cifar-100-python.tar.gz has no key 'data' \(its keys are \["),
    "float-data": (dict(blobs=_mutated(lambda b: b["test"].update({b"data": b["test"][b"data"].astype(np.float32)}))),
                   r"cifar-100-python/test in .*\['data'\] must be a uint8 array of shape \(N, 3072\).*got float32"),
    "hwc-data": (dict(blobs=_mutated(lambda b: b["train"].update({b"data": b["train"][b"data"].reshape(-1, 32, 32, 3)}))),
                 r"must be a uint8 array of shape \(N, 3072\), one 3x32x32 image per row \(got uint8 of shape "
                 r"\(100, 32, 32, 3\)\)"),
    "short-labels": (dict(blobs=_mutated(lambda b: b["train"].update({b"fine_labels": b["train"][b"fine_labels"][:5]}))),
                     r"\['fine_labels'\] must be 100 integer labels, one per row of 'data'"),
    "label-range": (dict(blobs=_mutated(lambda b: b["test"][b"coarse_labels"].__setitem__(0, 20))),
                    r"\['coarse_labels'\] has labels in \[0, 20\] but CIFAR-100 has 20"),
    "meta-names": (dict(blobs=_mutated(lambda b: b["meta"].update({b"fine_label_names": [b"a"] * 100}))),
                   r"\['fine_label_names'\] must be 100 distinct names"),
    "renamed-class": (dict(blobs=_mutated(lambda b: b["meta"][b"fine_label_names"].__setitem__(2, b"infant"))),
                      r"has no fine labels named \['baby'\] \(CIFAR-FS test classes\); it is not the official"),
    "mixed-superclass": (dict(blobs=_mutated(lambda b: b["test"][b"coarse_labels"].__setitem__(0, 3))),
                         r"the classes \['apple'\] belong to more than one superclass"),
    "not-a-dict": (dict(raw={"cifar-100-python/meta": _py2_pickle([1, 2])}),
                   r"cifar-100-python/meta in cifar-100-python.tar.gz holds a list, not the dict of the official"),
    "code-in-pickle": (dict(raw={"cifar-100-python/meta": pickle.dumps({b"x": _Evil()}, protocol=2)}),
                       r"references posix.system, which a data file of numpy arrays never needs \(a pickle can run "
                       r"code\); refusing it"),
    "truncated-pickle": (dict(raw={"cifar-100-python/train": _py2_pickle({b"data": np.zeros((4, 3072), np.uint8)})[:-40]}),
                         r"cannot read cifar-100-python/train in cifar-100-python.tar.gz as a pickle .*corrupt or "
                         r"truncated"),
}


@pytest.mark.parametrize("case", list(CIFAR_MALFORMED))
def test_cifar_malformed_tarball_is_refused(tmp_path, case):
    kwargs, message = CIFAR_MALFORMED[case]
    root = tmp_path / "data"
    write_tarball(root / "cifar-100-python.tar.gz", **kwargs)
    with pytest.raises(ValueError, match=message):
        load_cifar_fs(root, "test", cache_dir=tmp_path / "c", check_md5=False)
    assert not list((tmp_path / "c").glob("*.pt")) and not Path("/tmp/metafunc-pwned").exists()


def test_cifar_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_fc100: the data root .*nope.* does not exist"):
        load_fc100(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"lacks cifar-100-python.tar.gz; copy the official CIFAR-100 python "
                                                r"release there \(https://www.cs.toronto.edu/~kriz/"):
        load_fc100(tmp_path)
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"<html>not a tarball</html>")
    with pytest.raises(ValueError, match=r"is not a valid tar.gz file .*corrupt or truncated"):
        load_fc100(tmp_path, cache_dir=tmp_path / "c", check_md5=False)
    good = write_tarball(tmp_path / "good" / "cifar-100-python.tar.gz").read_bytes()
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"corrupt or truncated"):
        load_fc100(tmp_path, cache_dir=tmp_path / "c", check_md5=False)
    with pytest.raises(ValueError, match=r"load_fc100: split must be 'train', 'val' or 'test' \(got 'valid'\)"):
        load_fc100(tmp_path, "valid")


# ----------------------------------------------------------------------------------- a fake miniImageNet


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _colour(c: int) -> tuple[int, int, int]:
    return (2 * c % 256, 255 - c, 7)


def mini_csv_root(root: Path, *, classes=(64, 16, 20), per_class=2, size=(20, 16)) -> Path:
    """``{split}.csv`` + ``images/`` as Ravi & Larochelle distribute them; image ``j`` of class ``c`` (global index)
    is a solid ``_colour(c)`` image of ``size`` (width, height), not 84x84, saved as JPEG, PNG or grayscale PNG."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    c = 0
    for split, count in zip(("train", "val", "test"), classes):
        lines = ["filename,label"]
        for _ in range(count):
            wnid = f"n{c:08d}"
            for j in range(per_class):
                name = f"{wnid}{j:08d}.jpg"
                pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
                pixels[...] = _colour(c)
                fmt = "JPEG" if j == 0 else "PNG"
                (root / "images" / name).write_bytes(_encode(pixels, fmt))
                lines.append(f"{name},{wnid}")
            c += 1
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory) -> Path:
    return mini_csv_root(tmp_path_factory.mktemp("mini"))


def _check_mini(data, split, offset, per_class=2, size=84):
    n = {"train": 64, "val": 16, "test": 20}[split]
    assert data.class_names == [f"n{offset + i:08d}" for i in range(n)]
    assert data.images.shape == (n * per_class, 3, size, size) and data.images.dtype == torch.uint8
    assert torch.equal(data.labels, torch.arange(n).repeat_interleave(per_class))
    want = torch.tensor([_colour(offset + int(y)) for y in data.labels], dtype=torch.float32)
    got = data.images.float().mean(dim=(2, 3))
    assert (got - want).abs().max() < 4                                    # JPEG is lossy; the colour is kept


def test_mini_imagenet_from_csv(mini_root, tmp_path):
    for split, offset in (("train", 0), ("val", 64), ("test", 80)):
        _check_mini(load_mini_imagenet(mini_root, split, cache_dir=tmp_path), split, offset)
    small = load_mini_imagenet(mini_root, "val", cache_dir=tmp_path, image_size=32)
    assert small.images.shape == (32, 3, 32, 32)
    samplers = mini_imagenet_samplers(mini_root, ways=5, shots=1, queries=1, cache_dir=tmp_path)
    assert {k: v.num_classes for k, v in samplers.items()} == {"train": 64, "val": 16, "test": 20}
    assert mini_imagenet_samplers(mini_root, ways=20, shots=1, queries=1, cache_dir=tmp_path).ways == {
        "train": 20, "val": 16, "test": 20}
    task = samplers["test"].sample(2, torch.Generator().manual_seed(0))
    assert task.support_x.shape == (2, 5, 3, 84, 84) and float(task.support_x.max()) <= 1
    assert len(list(tmp_path.glob("mini_imagenet-csv-*.pt"))) == 4


def test_mini_csv_cache_is_reused_and_rebuilt_when_an_image_changes(tmp_path, monkeypatch):
    root = mini_csv_root(tmp_path / "data", classes=(3, 2, 2), per_class=2)
    cache = tmp_path / "cache"
    first = load_mini_imagenet(root, "val", cache_dir=cache, strict_counts=False)
    assert len(list(cache.glob("*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(mini_module, "decode_images", no_decoding)
    assert torch.equal(load_mini_imagenet(root, "val", cache_dir=cache, strict_counts=False).images, first.images)
    with pytest.raises(AssertionError, match="cache should have been used"):  # another split is not cached yet
        load_mini_imagenet(root, "test", cache_dir=cache, strict_counts=False)
    monkeypatch.undo()
    pixels = np.zeros((16, 20, 3), dtype=np.uint8)
    (root / "images" / "n0000000300000001.jpg").write_bytes(_encode(pixels))   # the source changed
    changed = load_mini_imagenet(root, "val", cache_dir=cache, strict_counts=False)
    assert len(list(cache.glob("*.pt"))) == 2 and int(changed.images[1].max()) == 0


def test_mini_class_counts_are_checked(tmp_path):
    root = mini_csv_root(tmp_path / "data", classes=(5, 16, 20), per_class=1)
    with pytest.raises(ValueError, match=r"load_mini_imagenet: train.csv has 5 classes but the 'train' split of the "
                                         r"paper has 64; .*pass strict_counts=False"):
        load_mini_imagenet(root, "train", cache_dir=tmp_path / "c")
    assert load_mini_imagenet(root, "train", cache_dir=tmp_path / "c", strict_counts=False).num_classes == 5


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


MINI_CSV_MALFORMED = {
    "no-header": (lambda r: _write(r / "val.csv", "n0000000000000000.jpg,n00000000\n"),
                  ValueError, r"val.csv must start with the header line 'filename,label' \(got "
                              r"'n0000000000000000.jpg,n00000000'\)"),
    "bad-line": (lambda r: _write(r / "val.csv", "filename,label\nn0000000000000000.jpg,n00000000\njust-a-name\n"),
                 ValueError, r"line 3 of .*val.csv is 'just-a-name'; every line after the header must be "
                             r"'filename,label'"),
    "duplicate": (lambda r: _write(r / "val.csv", "filename,label\na.jpg,n1\na.jpg,n2\n"),
                  ValueError, r"val.csv lists 'a.jpg' twice"),
    "escape": (lambda r: _write(r / "val.csv", "filename,label\n../../etc/passwd,n1\n"),
               ValueError, r"val.csv holds the entry '../../etc/passwd', whose path escapes the data folder"),
    "missing-image": (lambda r: (r / "images" / "n0000000000000001.jpg").unlink(),
                      FileNotFoundError, r"1 of the 32 images that val.csv lists are missing from .*images "
                                         r"\(e.g. \['n0000000000000001.jpg'\]\)"),
    "corrupt-image": (lambda r: (r / "images" / "n0000000100000000.jpg").write_bytes(b"\xff\xd8 not a jpeg"),
                      ValueError, r"cannot decode .*n0000000100000000.jpg .*the file is corrupt"),
    "no-images-folder": (lambda r: shutil.rmtree(r / "images"),
                         FileNotFoundError, r"has val.csv but no images/ folder"),
    "no-source": (lambda r: (r / "val.csv").unlink(),
                  FileNotFoundError, r"lacks mini-imagenet-cache-validation.pkl and val.csv; put there "
                                     r"learn2learn's mini-imagenet-cache-validation.pkl"),
}


@pytest.mark.parametrize("case", list(MINI_CSV_MALFORMED))
def test_mini_malformed_csv_source_is_refused(tmp_path, case):
    change, error, message = MINI_CSV_MALFORMED[case]
    root = mini_csv_root(tmp_path / "data", classes=(0, 16, 0), per_class=2)
    change(root)
    with pytest.raises(error, match=message):
        load_mini_imagenet(root, "val", cache_dir=tmp_path / "c")


def test_mini_splits_must_be_disjoint(tmp_path):
    root = mini_csv_root(tmp_path / "data", classes=(3, 2, 2), per_class=2)
    lines = (root / "test.csv").read_text().splitlines()
    (root / "test.csv").write_text("\n".join(lines + ["n0000000000000000.jpg,n00000000"]) + "\n")
    with pytest.raises(ValueError, match=r"mini_imagenet_samplers: the classes \['n00000000'\] are in both the "
                                         r"'train' and the 'test' split"):
        mini_imagenet_samplers(root, ways=2, shots=1, queries=1, cache_dir=tmp_path / "c", strict_counts=False)


# ----------------------------------------------------------------------------------- learn2learn's pickles


def l2l_blob(classes: int, per_class: int = 2, offset: int = 0, size: int = 84) -> dict:
    """learn2learn's cache: rows in an interleaved order, channel 0 = class index, 1 = row % 256, 2 = 7."""
    n = classes * per_class
    data = np.zeros((n, size, size, 3), dtype=np.uint8)
    class_dict: dict[str, list[int]] = {}
    for row in range(n):
        c = row % classes
        data[row, ..., 0], data[row, ..., 1], data[row, ..., 2] = offset + c, row % 256, 7
        class_dict.setdefault(f"n{offset + c:08d}", []).append(row)
    return {"image_data": data, "class_dict": dict(reversed(list(class_dict.items())))}


def write_l2l(root: Path, blobs: dict[str, object], protocol: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, blob in blobs.items():
        (root / MINI_IMAGENET_PICKLES[split]).write_bytes(pickle.dumps(blob, protocol=protocol))
    return root


def test_mini_imagenet_from_learn2learn_pickles(tmp_path):
    root = write_l2l(tmp_path / "data", {"train": l2l_blob(64), "val": l2l_blob(16, offset=64),
                                         "test": l2l_blob(20, offset=80)})
    mini_csv_root(root, classes=(64, 0, 0), per_class=1, size=(4, 4))     # a CSV too: "auto" takes the pickle
    for split, offset in (("train", 0), ("val", 64), ("test", 80)):
        data = load_mini_imagenet(root, split, cache_dir=tmp_path / "c")
        n = data.num_classes
        assert data.class_names == [f"n{offset + i:08d}" for i in range(n)]
        assert data.images.shape == (2 * n, 3, 84, 84) and torch.equal(data.labels, torch.arange(n).repeat_interleave(2))
        assert torch.equal(data.images[:, 0, 0, 0].long(), data.labels + offset)     # NHWC -> NCHW, rows to classes
        assert bool((data.images[:, 2] == 7).all())
    assert load_mini_imagenet(root, "train", source="csv", cache_dir=tmp_path / "c").images.shape[0] == 64
    small = load_mini_imagenet(root, "val", cache_dir=tmp_path / "c", image_size=32)
    assert small.images.shape == (32, 3, 32, 32) and torch.equal(small.images[:, 0, 5, 5].long(), small.labels + 64)
    samplers = mini_imagenet_samplers(root, ways=5, shots=1, queries=1, cache_dir=tmp_path / "c")
    assert samplers["train"].sample(2, torch.Generator().manual_seed(0)).query_x.shape == (2, 5, 3, 84, 84)


def _l2l_with(change):
    blob = l2l_blob(16, offset=64)
    change(blob)
    return blob


L2L_MALFORMED = {
    "not-a-dict": (lambda: [1, 2], r"mini-imagenet-cache-validation.pkl holds a list, not the learn2learn dict"),
    "missing-key": (lambda: _l2l_with(lambda b: b.pop("class_dict")),
                    r"lacks the key\(s\) \['class_dict'\] \(its keys are \['image_data'\]\)"),
    "float-images": (lambda: _l2l_with(lambda b: b.update(image_data=b["image_data"].astype(np.float32))),
                     r"\['image_data'\] must be a uint8 array of shape \(N, 84, 84, 3\) \(got float32 of shape"),
    "nchw-images": (lambda: _l2l_with(lambda b: b.update(image_data=b["image_data"].transpose(0, 3, 1, 2).copy())),
                    r"must be a uint8 array of shape \(N, 84, 84, 3\) \(got uint8 of shape \(32, 3, 84, 84\)\)"),
    "row-range": (lambda: _l2l_with(lambda b: b["class_dict"]["n00000064"].append(99)),
                  r"\['class_dict'\]\['n00000064'\] has row indices in \[0, 99\] but 'image_data' has 32 rows"),
    "shared-row": (lambda: _l2l_with(lambda b: b["class_dict"]["n00000065"].append(0)),
                   r"\['class_dict'\]\['n00000065'\] lists rows that another class \(or this one\) lists already"),
    "unowned-rows": (lambda: _l2l_with(lambda b: b["class_dict"].pop("n00000070")),
                     r"\['class_dict'\] gives no class to 2 of the 32 rows"),
    "code": (lambda: {"image_data": _Evil()}, r"references posix.system.*refusing it"),
}


@pytest.mark.parametrize("case", list(L2L_MALFORMED))
def test_mini_malformed_pickle_is_refused(tmp_path, case):
    make, message = L2L_MALFORMED[case]
    root = write_l2l(tmp_path / "data", {"val": make()})
    with pytest.raises(ValueError, match=f"load_mini_imagenet: .*{message}"):
        load_mini_imagenet(root, "val", cache_dir=tmp_path / "c")


def test_mini_truncated_pickle_and_counts(tmp_path):
    root = write_l2l(tmp_path / "data", {"val": l2l_blob(16, offset=64), "test": l2l_blob(3)})
    path = root / MINI_IMAGENET_PICKLES["val"]
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"cannot read mini-imagenet-cache-validation.pkl as a pickle .*corrupt or "
                                         r"truncated"):
        load_mini_imagenet(root, "val", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=r"mini-imagenet-cache-test.pkl has 3 classes but the 'test' split of the "
                                         r"paper has 20"):
        load_mini_imagenet(root, "test", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=r"source must be 'auto', 'csv' or 'pickle' \(got 'zip'\)"):
        load_mini_imagenet(root, "test", source="zip")
    with pytest.raises(FileNotFoundError, match=r"lacks mini-imagenet-cache-train.pkl; put there"):
        load_mini_imagenet(root, "train", source="pickle")


# --------------------------------------------------------------------------------------- tieredImageNet


def write_tiered(root: Path, split: str, classes: int, per_class: int = 1, *, bytes_keys: bool = True,
                 names: bool = True, as_arrays: bool = True, labels_override=None, images_override=None,
                 blue: int = 9) -> Path:
    """Ren et al.'s pair: a list of PNGs (1-D uint8 arrays, as cv2.imencode gives, or bytes) and a labels dict,
    pickled by Python 2 (``str`` keys and names as byte strings; :func:`_py2_pickle`), or with ``bytes_keys=False`` a
    copy re-saved by Python 3 (text keys, protocol 4). Class ids are numbered ``classes - 1 .. 0`` in file order,
    named ``n<split[:2]><id>`` (so no name is in two splits); image colour red = id % 256, green = id // 256, blue =
    ``blue``."""
    root.mkdir(parents=True, exist_ok=True)
    images, specific = [], []
    for i in range(classes * per_class):
        c = classes - 1 - i % classes
        pixels = np.empty((84, 84, 3), dtype=np.uint8)
        pixels[...] = (c % 256, c // 256, blue)
        png = _encode(pixels)
        images.append(np.frombuffer(png, dtype=np.uint8).copy() if as_arrays else png)
        specific.append(c)
    labels: dict = {"label_specific": np.array(specific, dtype=np.int64),
                    "label_general": np.array([c // 3 for c in specific], dtype=np.int64)}
    if names:
        labels["label_specific_str"] = [f"n{split[:2]}{c:07d}".encode() for c in range(classes)]
        labels["label_general_str"] = [f"g{g}".encode() for g in range(classes // 3 + 1)]
    if bytes_keys:
        labels = {k.encode(): v for k, v in labels.items()}
    labels = labels_override if labels_override is not None else labels
    images_obj = images_override if images_override is not None else images
    dump = _py2_pickle if bytes_keys else functools.partial(pickle.dumps, protocol=4)
    (root / f"{split}_images_png.pkl").write_bytes(dump(images_obj))
    (root / f"{split}_labels.pkl").write_bytes(dump(labels))
    return root


def test_tiered_imagenet(tmp_path):
    root = write_tiered(tmp_path / "data", "val", 97, per_class=2)
    data = load_tiered_imagenet(root, "val", cache_dir=tmp_path / "c")
    assert data.num_classes == 97 and data.class_names == [f"nva{c:07d}" for c in range(97)]
    assert data.images.shape == (194, 3, 84, 84) and torch.equal(data.labels, torch.arange(97).repeat_interleave(2))
    assert torch.equal(data.images[:, 0, 0, 0].long(), data.labels) and bool((data.images[:, 2] == 9).all())
    write_tiered(root, "train", 4, per_class=3, bytes_keys=False, names=False, as_arrays=False)
    write_tiered(root, "test", 3, per_class=2)
    train = load_tiered_imagenet(root, "train", cache_dir=tmp_path / "c", strict_counts=False, image_size=32)
    assert train.class_names == ["train-0", "train-1", "train-2", "train-3"]
    assert train.images.shape == (12, 3, 32, 32) and torch.equal(train.labels, torch.arange(4).repeat_interleave(3))
    with pytest.raises(ValueError, match=r"load_tiered_imagenet: train_labels.pkl has 4 classes but the 'train' split "
                                         r"of the paper has 351; .*strict_counts=False"):
        load_tiered_imagenet(root, "train", cache_dir=tmp_path / "c", image_size=32)
    samplers = tiered_imagenet_samplers(root, ways=3, shots=1, queries=1, cache_dir=tmp_path / "c",
                                        strict_counts=False)
    assert {k: v.num_classes for k, v in samplers.items()} == {"train": 4, "val": 97, "test": 3}
    assert samplers["val"].sample(2, torch.Generator().manual_seed(0)).support_x.shape == (2, 3, 3, 84, 84)


def test_tiered_cache_is_reused_and_rebuilt(tmp_path, monkeypatch):
    root = write_tiered(tmp_path / "data", "test", 3, per_class=2)
    cache = tmp_path / "cache"
    first = load_tiered_imagenet(root, "test", cache_dir=cache, strict_counts=False)
    monkeypatch.setattr(mini_module, "decode_images", lambda *a, **k: (_ for _ in ()).throw(AssertionError("cache")))
    assert torch.equal(load_tiered_imagenet(root, "test", cache_dir=cache, strict_counts=False).images, first.images)
    monkeypatch.undo()
    write_tiered(root, "test", 4, per_class=2)
    assert load_tiered_imagenet(root, "test", cache_dir=cache, strict_counts=False).num_classes == 4
    assert len(list(cache.glob("tiered_imagenet-test-84-*.pt"))) == 2


TIERED_MALFORMED = {
    "no-label-key": (dict(labels_override={b"labels": [0, 1, 2]}),
                     r"test_labels.pkl has no key 'label_specific' \(its keys are \['labels'\]\)"),
    "float-labels": (dict(labels_override={b"label_specific": np.zeros(3, np.float32)}),
                     r"test_labels.pkl\['label_specific'\] must be non-negative integer class ids"),
    "general-shape": (dict(labels_override={b"label_specific": np.arange(3), b"label_general": np.arange(2)}),
                      r"\['label_general'\] has shape \(2,\) but 'label_specific' has \(3,\)"),
    "few-names": (dict(labels_override={b"label_specific": np.arange(3), b"label_specific_str": [b"a"]}),
                  r"\['label_specific_str'\] must hold one name per class id \(ids go up to 2"),
    "count-mismatch": (dict(labels_override={b"label_specific": np.arange(5)}),
                       r"test_images_png.pkl holds 3 images but test_labels.pkl has 5 labels"),
    "not-a-list": (dict(images_override={"x": 1}), r"test_images_png.pkl holds a dict, not the non-empty list of "
                                                   r"PNG-encoded images"),
    "decoded-item": (dict(images_override=[np.zeros((84, 84, 3), np.uint8)] * 3),
                     r"item 0 of test_images_png.pkl is a uint8 array of shape \(84, 84, 3\), not PNG-encoded bytes"),
    "corrupt-png": (dict(images_override=[_encode(np.zeros((8, 8, 3), np.uint8)), _encode(np.zeros((8, 8, 3), np.uint8)),
                                          b"\x89PNG\r\n\x1a\n garbage"]),
                    r"cannot decode image 2 of test_images_png.pkl"),
}


@pytest.mark.parametrize("case", list(TIERED_MALFORMED))
def test_tiered_malformed_files_are_refused(tmp_path, case):
    kwargs, message = TIERED_MALFORMED[case]
    root = write_tiered(tmp_path / "data", "test", 3, **kwargs)
    with pytest.raises(ValueError, match=f"load_tiered_imagenet: .*{message}"):
        load_tiered_imagenet(root, "test", cache_dir=tmp_path / "c", strict_counts=False)
    assert not list((tmp_path / "c").glob("*.pt"))


def test_tiered_missing_file(tmp_path):
    write_tiered(tmp_path, "val", 2)
    (tmp_path / "val_labels.pkl").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks val_labels.pkl; copy the tieredImageNet files of Ren et al."):
        load_tiered_imagenet(tmp_path, "val")
