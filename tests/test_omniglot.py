"""Omniglot from the official zips: decoding, deduplication, cache, splits, samplers, download and bad input."""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import metafunc.data._benchmark as benchmark_module
import metafunc.data.omniglot as omniglot_module
from metafunc.data import (
    OMNIGLOT_MD5,
    EpisodeSampler,
    Omniglot,
    download_omniglot,
    load_omniglot,
    omniglot_samplers,
    omniglot_splits,
)

SMALL = ("images_background_small1", "images_background_small2")


@pytest.fixture(scope="session")
def omniglot_root(data_root: Path) -> Path:
    root = data_root / "omniglot"
    if not root.is_dir():
        pytest.fail(f"{root} is missing: the shared data folder must hold omniglot/")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache folder per test session, shared with test_omniglot_training.py (the zips are decoded once)."""
    path = tmp_path_factory.getbasetemp() / "omniglot_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def small(omniglot_root: Path, cache_dir: Path) -> Omniglot:
    """The two small zips, decoded once per test session."""
    return load_omniglot(omniglot_root, variant="small", cache_dir=cache_dir)


def png_bytes(array: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array.numpy()).save(buf, format="PNG")
    return buf.getvalue()


def write_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def fake_release(root: Path, zips: dict[str, dict[str, int]], size: int = 10, drawers: int = 2) -> Path:
    """Zips in the official layout; ``zips[name][Alphabet] = number of characters`` (``drawers`` drawings each)."""
    root.mkdir(parents=True, exist_ok=True)
    for zname, alphabets in zips.items():
        entries = {}
        for alphabet, count in alphabets.items():
            for c in range(1, count + 1):
                for d in range(1, drawers + 1):
                    img = torch.full((size, size), 255, dtype=torch.uint8)
                    img[: c % size + 1, d] = 0
                    entries[f"{zname}/{alphabet}/character{c:02d}/{c:04d}_{d:02d}.png"] = png_bytes(img)
        write_zip(root / f"{zname}.zip", entries)
    return root


# --------------------------------------------------------------------------------------------- the real data


def test_small_release_content(small: Omniglot):
    assert small.images.shape == (4840, 28, 28) and small.images.dtype == torch.uint8
    assert small.labels.dtype == torch.int64 and small.num_classes == 242
    assert len(set(small.characters)) == 242  # Greek and Latin (in both zips) counted once
    assert torch.equal(torch.bincount(small.labels), torch.full((242,), 20))
    counts = {a: small.alphabets.count(a) for a in set(small.alphabets)}
    assert counts == {"Balinese": 24, "Early_Aramaic": 22, "Greek": 24, "Korean": 40, "Latin": 26,
                      "Japanese_(katakana)": 47, "Sanskrit": 42, "Tagalog": 17}
    # strokes are 1 (255) on a 0 background: ink covers a small part of each image, the border is background
    ink = small.images.float() / 255
    assert 0.03 < ink.mean() < 0.2
    assert ink[:, 0, :].mean() < 0.01 and ink.amax(dim=(1, 2)).min() > 0.5
    # anti-aliased: intermediate grey levels exist
    assert ((small.images > 20) & (small.images < 235)).float().mean() > 0.01


def test_decoding_matches_an_area_average_of_the_original(small: Omniglot, omniglot_root: Path):
    from PIL import Image

    with zipfile.ZipFile(omniglot_root / "images_background_small1.zip") as z:
        raw = z.read("images_background_small1/Balinese/character01/0108_01.png")
    original = torch.frombuffer(bytearray(Image.open(io.BytesIO(raw)).convert("L").tobytes()), dtype=torch.uint8)
    stroke = 1 - original.float().view(1, 1, 105, 105) / 255
    area = F.interpolate(stroke, size=(28, 28), mode="area")[0, 0]
    index = small.characters.index("Balinese/character01")
    ours = small.images[small.labels == index][0].float() / 255
    assert (ours - area).abs().mean() < 0.03
    assert torch.corrcoef(torch.stack([ours.flatten(), area.flatten()]))[0, 1] > 0.95


def test_cache_is_one_file_and_skips_decoding(small: Omniglot, omniglot_root: Path, cache_dir: Path, monkeypatch):
    files = list(cache_dir.glob("*.pt"))
    assert len(files) == 1 and not list(cache_dir.glob("*.tmp"))
    blob = torch.load(files[0], weights_only=True)
    assert torch.equal(blob["images"], small.images)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(omniglot_module, "_read_zip", no_decoding)
    again = load_omniglot(omniglot_root, cache_dir=cache_dir)
    assert torch.equal(again.images, small.images) and torch.equal(again.labels, small.labels)
    assert again.characters == small.characters


def test_cache_key_includes_image_size_and_md5(tmp_path):
    root = fake_release(tmp_path / "data", {SMALL[0]: {"A": 3}, SMALL[1]: {"B": 2}})
    cache = tmp_path / "cache"
    a = load_omniglot(root, image_size=8, cache_dir=cache, check_md5=False)
    b = load_omniglot(root, image_size=6, cache_dir=cache, check_md5=False)
    assert a.images.shape == (10, 8, 8) and b.images.shape == (10, 6, 6)
    assert len(list(cache.glob("*.pt"))) == 2
    fake_release(root, {SMALL[0]: {"A": 4}})  # new content, new md5: the cache must not be reused
    c = load_omniglot(root, image_size=8, cache_dir=cache, check_md5=False)
    assert c.num_classes == 6 and len(list(cache.glob("*.pt"))) == 3


def test_damaged_cache_is_rebuilt(tmp_path):
    root = fake_release(tmp_path / "data", {SMALL[0]: {"A": 2}, SMALL[1]: {"B": 2}})
    cache = tmp_path / "cache"
    first = load_omniglot(root, image_size=8, cache_dir=cache, check_md5=False)
    (cached,) = cache.glob("*.pt")
    cached.write_bytes(b"not a torch file")
    again = load_omniglot(root, image_size=8, cache_dir=cache, check_md5=False)
    assert torch.equal(first.images, again.images)


def test_alphabet_split(small: Omniglot):
    splits = omniglot_splits(small, test_alphabets=("Korean", "Sanskrit"), seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 140, "val": 20, "test": 82}
    assert {small.alphabets[i] for i in splits["test"]} == {"Korean", "Sanskrit"}
    train_alphabets = {small.alphabets[i] for i in splits["train"] + splits["val"]}
    assert not train_alphabets & {"Korean", "Sanskrit"} and len(train_alphabets) == 6
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == list(range(242))
    assert omniglot_splits(small, seed=0) == splits
    assert omniglot_splits(small, seed=1)["val"] != splits["val"]


def test_vinyals_split_on_a_full_sized_release(tmp_path):
    # 964 background and 659 evaluation characters, as in the official full release
    bg = {f"Alpha{i:02d}": 32 for i in range(30)} | {"Alpha30": 4}  # 30 * 32 + 4 = 964
    ev = {f"Beta{i:02d}": 33 for i in range(19)} | {"Beta19": 32}  # 19 * 33 + 32 = 659
    root = fake_release(tmp_path / "full", {"images_background": bg, "images_evaluation": ev}, size=6,
                        drawers=1)
    data = load_omniglot(root, variant="full", image_size=6, cache_dir=tmp_path / "c", check_md5=False)
    assert data.num_classes == 1623
    splits = omniglot_splits(data, split="vinyals", val_characters=100)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1100, "val": 100, "test": 423}
    first_1200 = set(splits["train"]) | set(splits["val"])
    assert first_1200 == set(range(1200))
    # all 964 background characters, then the first 236 evaluation characters in sorted order
    assert sum(a.startswith("Alpha") for a in (data.alphabets[i] for i in first_1200)) == 964
    assert data.characters[1199] == "Beta07/character05" and data.characters[1200] == "Beta07/character06"
    with pytest.raises(ValueError, match="split='vinyals' needs the full release"):
        omniglot_splits(Omniglot(data.images[:10], data.labels[:10] * 0, ["A/character01"]), split="vinyals")


def test_samplers_protocol(omniglot_root: Path, cache_dir: Path):
    samplers = omniglot_samplers(omniglot_root, ways=5, shots=1, queries=15, device="cpu", cache_dir=cache_dir,
                                 seed=0)
    assert set(samplers) == {"train", "val", "test"}
    assert samplers["train"].rotations and not samplers["val"].rotations and not samplers["test"].rotations
    assert samplers["train"].num_classes == 4 * 140 and samplers["test"].num_classes == 82
    task = samplers["train"].sample(32, torch.Generator().manual_seed(0))
    assert task.support_x.shape == (32, 5, 1, 28, 28) and task.query_x.shape == (32, 75, 1, 28, 28)
    assert task.support_x.dtype == torch.float32 and task.support_y.dtype == torch.int64
    assert task.support_x.min() >= 0 and task.support_x.max() == 1.0
    assert set(task.query_y.unique().tolist()) == set(range(5))
    # test images are exactly the Korean and Sanskrit drawings (no rotation)
    data = load_omniglot(omniglot_root, cache_dir=cache_dir)
    held = torch.tensor([a in ("Korean", "Sanskrit") for a in data.alphabets])[data.labels]
    test_task = samplers["test"].sample(4, torch.Generator().manual_seed(0))
    pool = data.images[held].float().div(255).flatten(1)
    drawn = test_task.query_x.flatten(0, 1).flatten(1)
    assert (torch.cdist(drawn, pool).min(dim=1).values < 0.05).all()  # other images are > 1 away
    # 20-way works on every split (val holds 20 characters)
    twenty = omniglot_samplers(omniglot_root, ways=20, shots=1, queries=5, cache_dir=cache_dir)
    assert twenty["val"].sample(2, torch.Generator().manual_seed(0)).support_x.shape == (2, 20, 1, 28, 28)


def _same_tasks(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_60_way_training_validates_at_20_way(omniglot_root: Path, cache_dir: Path):
    """Snell et al.'s setting: 60-way train episodes over 140 characters x 4 rotations; the 20 validation characters
    cap only the validation ways, and each split is built when first read."""
    samplers = omniglot_samplers(omniglot_root, ways=60, shots=5, queries=5, cache_dir=cache_dir)
    assert samplers.ways == {"train": 60, "val": 20, "test": 60} and samplers.built == ()
    assert samplers.num_classes == {"train": 560, "val": 20, "test": 82}
    train = samplers["train"].sample(2, torch.Generator().manual_seed(0))
    assert train.support_x.shape == (2, 300, 1, 28, 28) and set(train.query_y.unique().tolist()) == set(range(60))
    assert samplers.built == ("train",)
    val = samplers["val"]
    assert val.ways == 20 and samplers.built == ("train", "val")
    # the validation episodes are those of a 20-way run: the training ways change nothing in them
    twenty = omniglot_samplers(omniglot_root, ways=20, shots=5, queries=5, cache_dir=cache_dir)["val"]
    seeded = torch.Generator().manual_seed
    assert _same_tasks(val.sample(3, seeded(4)), twenty.sample(3, seeded(4)))
    # an explicit val_ways at most the split's 20 characters is taken as given
    five = omniglot_samplers(omniglot_root, ways=60, val_ways=5, shots=5, queries=5, cache_dir=cache_dir)
    assert five.ways["val"] == 5 and five["val"].sample(1, torch.Generator().manual_seed(0)).support_x.shape[1] == 25


def test_30_way_test_sampler_never_builds_val(omniglot_root: Path, cache_dir: Path, monkeypatch):
    samplers = omniglot_samplers(omniglot_root, ways=30, shots=1, queries=5, cache_dir=cache_dir)
    test = samplers["test"]
    assert samplers.built == ("test",) and test.ways == 30 and test.num_classes == 82
    task = test.sample(2, torch.Generator().manual_seed(0))
    assert task.support_x.shape == (2, 30, 1, 28, 28) and task.query_y.shape == (2, 150)
    assert "val" in samplers and list(samplers) == ["train", "val", "test"] and samplers.built == ("test",)
    # for ways <= 20 every split draws the episodes it drew before (same seed, same episodes)
    five = omniglot_samplers(omniglot_root, ways=5, shots=1, queries=15, cache_dir=cache_dir)
    data = load_omniglot(omniglot_root, cache_dir=cache_dir)
    splits = omniglot_splits(data)
    for name in ("train", "val", "test"):
        mask = torch.isin(data.labels, torch.tensor(splits[name]))
        direct = EpisodeSampler(data.images[mask].unsqueeze(1), data.labels[mask], ways=5, shots=1, queries=15,
                                rotations=name == "train")
        g = torch.Generator().manual_seed(11)
        assert _same_tasks(five[name].sample(4, g), direct.sample(4, torch.Generator().manual_seed(11)))


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_omniglot: the data root .*nope.* does not exist"):
        load_omniglot(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"lacks images_background_small1.zip, images_background_small2.zip"):
        load_omniglot(tmp_path)


def test_wrong_md5_is_refused(tmp_path, omniglot_root: Path):
    for name in SMALL:
        shutil.copy(omniglot_root / f"{name}.zip", tmp_path / f"{name}.zip")
    with open(tmp_path / f"{SMALL[1]}.zip", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(ValueError, match=rf"has md5 [0-9a-f]{{32}} but the official {SMALL[1]}.zip has md5 "
                                         rf"{OMNIGLOT_MD5[SMALL[1]]}"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")


def test_truncated_zip(tmp_path, omniglot_root: Path):
    data = (omniglot_root / f"{SMALL[0]}.zip").read_bytes()
    (tmp_path / f"{SMALL[0]}.zip").write_bytes(data[: len(data) // 2])
    shutil.copy(omniglot_root / f"{SMALL[1]}.zip", tmp_path / f"{SMALL[1]}.zip")
    with pytest.raises(ValueError, match="md5"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="is not a valid zip file .*corrupt or truncated"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache", check_md5=False)


def test_corrupt_member(tmp_path):
    root = fake_release(tmp_path, {SMALL[1]: {"B": 1}})
    write_zip(root / f"{SMALL[0]}.zip", {f"{SMALL[0]}/A/character01/0001_01.png": b"\x89PNG garbage"})
    with pytest.raises(ValueError, match=r"cannot decode .*0001_01.png.*the zip is corrupt"):
        load_omniglot(root, cache_dir=tmp_path / "cache", check_md5=False)


@pytest.mark.parametrize("member", ["../escape.png", "/abs/path.png", f"{SMALL[0]}/A/../../../x.png"])
def test_paths_escaping_the_folder_are_refused(tmp_path, member):
    root = fake_release(tmp_path, {SMALL[1]: {"B": 1}})
    write_zip(root / f"{SMALL[0]}.zip", {member: png_bytes(torch.zeros(4, 4, dtype=torch.uint8))})
    with pytest.raises(ValueError, match="whose path escapes the data folder"):
        load_omniglot(root, cache_dir=tmp_path / "cache", check_md5=False)


def test_wrong_layout(tmp_path):
    root = fake_release(tmp_path, {SMALL[1]: {"B": 1}})
    write_zip(root / f"{SMALL[0]}.zip", {"A/0001_01.png": png_bytes(torch.zeros(4, 4, dtype=torch.uint8))})
    with pytest.raises(ValueError, match="the official layout is <split>/<Alphabet>/characterNN"):
        load_omniglot(root, cache_dir=tmp_path / "cache", check_md5=False)


def test_split_and_sampler_errors(small: Omniglot, omniglot_root: Path, cache_dir: Path):
    with pytest.raises(ValueError, match=r"test_alphabets \['Klingon'\] are not in this data set"):
        omniglot_splits(small, test_alphabets=("Klingon",))
    with pytest.raises(ValueError, match="variant must be 'small' or 'full'"):
        load_omniglot(omniglot_root, variant="medium")
    with pytest.raises(ValueError, match=r"omniglot_samplers: val_ways = 21 but the 'val' split \(20 characters of "
                                         r"20 drawings\) has only 20 classes; pass val_ways <= 20, or val_ways=None"):
        omniglot_samplers(omniglot_root, ways=5, val_ways=21, shots=1, queries=1, cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"omniglot_samplers: val_ways must be >= 1 \(got 0\)"):
        omniglot_samplers(omniglot_root, ways=5, val_ways=0, shots=1, queries=1, cache_dir=cache_dir)
    with pytest.raises(TypeError, match=r"omniglot_samplers: val_ways must be an int \(got bool True\)"):
        omniglot_samplers(omniglot_root, ways=5, val_ways=True, shots=1, queries=1, cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"omniglot_samplers: ways must be >= 1 \(got 0\)"):
        omniglot_samplers(omniglot_root / "not-read", ways=0, shots=1, queries=1, cache_dir=cache_dir)
    # ways beyond the test split's 82 characters: the test split refuses it when it is first read, not before
    samplers = omniglot_samplers(omniglot_root, ways=83, shots=1, queries=1, cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"omniglot_samplers: the 'test' split \(82 characters of 20 drawings\): "
                                         r"EpisodeSampler: ways = 83 but the data set has only 82 classes"):
        samplers["test"]
    assert samplers["train"].ways == 83 and samplers.built == ("train",)
    # no validation characters: train and test work, the empty val split raises only if it is read
    no_val = omniglot_samplers(omniglot_root, ways=5, shots=1, queries=1, cache_dir=cache_dir, val_characters=0)
    assert no_val.num_classes["val"] == 0 and no_val["train"].num_classes == 4 * 160
    with pytest.raises(ValueError, match=r"omniglot_samplers: the 'val' split \(0 characters of 20 drawings\): "
                                         r"EpisodeSampler: the data set is empty"):
        no_val["val"]
    with pytest.raises(ValueError, match=r"shots \+ queries = 5 \+ 16 = 21 but some classes have only 20"):
        omniglot_samplers(omniglot_root, ways=5, shots=5, queries=16, cache_dir=cache_dir)


# ------------------------------------------------------------------------------------------------- download


def test_download_from_a_file_url_checks_md5(tmp_path, omniglot_root: Path, monkeypatch):
    monkeypatch.setitem(OMNIGLOT_MD5, "images_background", OMNIGLOT_MD5[SMALL[0]])
    monkeypatch.setitem(OMNIGLOT_MD5, "images_evaluation", OMNIGLOT_MD5[SMALL[1]])
    server = tmp_path / "server"
    server.mkdir()
    shutil.copy(omniglot_root / f"{SMALL[0]}.zip", server / "images_background.zip")
    shutil.copy(omniglot_root / f"{SMALL[1]}.zip", server / "images_evaluation.zip")
    paths = download_omniglot(tmp_path / "dl", variant="full", base_url=server.as_uri())
    assert [p.name for p in paths] == ["images_background.zip", "images_evaluation.zip"]
    assert paths[0].read_bytes() == (omniglot_root / f"{SMALL[0]}.zip").read_bytes()
    assert sorted(os.listdir(tmp_path / "dl")) == ["images_background.zip", "images_evaluation.zip"]


def test_download_with_wrong_md5_keeps_nothing(tmp_path, monkeypatch):
    def fetch(url: str, dest: Path, progress=None) -> None:
        dest.write_bytes(b"<html>rate limited</html>")

    monkeypatch.setattr(benchmark_module, "_fetch", fetch)
    with pytest.raises(ValueError, match=r"download_omniglot: .*images_background_small1.zip has md5 [0-9a-f]{32} "
                                         r"but the official"):
        download_omniglot(tmp_path, variant="small")
    assert os.listdir(tmp_path) == []


def test_download_network_error(tmp_path, monkeypatch):
    def fetch(url: str, dest: Path, progress=None) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(benchmark_module, "_fetch", fetch)
    with pytest.raises(OSError, match=r"could not download https://raw.githubusercontent.com/brendenlake/omniglot/"
                                      r"master/python/images_background_small1.zip .*Name or service not known.*; "
                                      r"check the network, or download images_background_small1.zip by hand .* and "
                                      rf"copy it into {tmp_path}"):
        load_omniglot(tmp_path, download=True)
    assert os.listdir(tmp_path) == []
