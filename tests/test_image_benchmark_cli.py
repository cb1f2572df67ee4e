"""``metafunc train --dataset cifar_fs | fc100 | mini_imagenet | tiered_imagenet`` with ``--backbone conv4 |
resnet12`` runs end to end on small files made in the exact formats (``tests/test_image_benchmarks.py`` builds
them), with the papers' defaults, and augments metric learners' training episodes on the device."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from test_image_benchmarks import mini_csv_root, write_tarball, write_tiered

from metafunc.cli import main
from metafunc.data import AugmentedSource, random_crop_flip
from metafunc.train import DATASETS, TrainConfig, build_experiment, resolve_config

SMALL = ["--iterations", "1", "--meta-batch", "1", "--queries", "1", "--val-every", "0", "--val-episodes", "2",
         "--no-progress"]


def test_papers_defaults_for_the_image_benchmarks():
    cfg = resolve_config(TrainConfig(dataset="mini_imagenet"))
    assert (cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch, cfg.inner_lr, cfg.inner_steps, cfg.eval_inner_steps,
            cfg.width, cfg.iterations) == (5, 1, 15, 4, 0.01, 5, 10, 32, 60000)
    assert resolve_config(TrainConfig(dataset="cifar_fs", algorithm="protonet")).augment is True
    assert resolve_config(TrainConfig(dataset="cifar_fs", algorithm="maml")).augment is False
    with pytest.raises(ValueError, match="--backbone resnet12 is for the image benchmarks"):
        resolve_config(TrainConfig(dataset="omniglot", backbone="resnet12"))


@pytest.mark.parametrize("algorithm, backbone", [("protonet", "conv4"), ("maml", "conv4"), ("protonet", "resnet12")])
def test_mini_imagenet_trains_and_evaluates_from_the_cli(algorithm, backbone, tmp_path, capsys):
    root = mini_csv_root(tmp_path / "mini")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "mini_imagenet", "--data-root", str(root), "--algorithm", algorithm,
                 "--backbone", backbone, "--width", "8", "--inner-steps", "1", *SMALL, "--out", str(out)]) == 0, \
        capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert (config["dataset"], config["backbone"], config["augment"]) == ("mini_imagenet", backbone,
                                                                          algorithm == "protonet")
    assert main(["evaluate", str(out / "checkpoint.pt"), "--episodes", "4", "--no-progress"]) == 0
    assert "5-way 1-shot" in capsys.readouterr().out


def test_cifar_fs_and_fc100_train_from_the_cli(tmp_path, monkeypatch, capsys):
    write_tarball(tmp_path / "cifar" / "cifar-100-python.tar.gz")
    for name in ("cifar_fs", "fc100"):     # the made-up tarball has not the official md5
        spec = DATASETS[name]
        monkeypatch.setitem(DATASETS, name, dataclasses.replace(spec, factory=functools.partial(spec.factory,
                                                                                                check_md5=False)))
    for dataset in ("cifar_fs", "fc100"):
        out = tmp_path / dataset
        assert main(["train", "--dataset", dataset, "--data-root", str(tmp_path / "cifar"), "--algorithm", "protonet",
                     "--width", "8", *SMALL, "--out", str(out)]) == 0, capsys.readouterr().err
        exp = build_experiment(resolve_config(TrainConfig(dataset=dataset, data_root=str(tmp_path / "cifar"),
                                                          algorithm="protonet", width=8, queries=1)))
        assert isinstance(exp.sources["train"], AugmentedSource) and not isinstance(exp.sources["test"],
                                                                                    AugmentedSource)
        assert exp.sources["train"].sample(2, torch.Generator().manual_seed(0)).support_x.shape == (2, 5, 3, 32, 32)


TIERED_SPLITS = {"train": 351, "val": 97, "test": 160}     # Ren et al.'s classes per split
MINI_SPLITS = {"train": 64, "val": 16, "test": 20}


def test_tiered_imagenet_trains_and_evaluates_from_the_cli(tmp_path, monkeypatch, capsys):
    """tieredImageNet's own files (``{split}_images_png.pkl`` + ``{split}_labels.pkl``, Python 2 pickles) at the
    paper's class counts train and evaluate end to end, and the run's episodes come from tieredImageNet's classes:
    each split's images (blue marks the split's file), more classes than miniImageNet has, one class per label."""
    monkeypatch.setenv("METAFUNC_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "tiered"
    for mark, (split, classes) in enumerate(TIERED_SPLITS.items(), start=1):
        write_tiered(root, split, classes, per_class=2, blue=mark)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "tiered_imagenet", "--data-root", str(root), "--algorithm", "maml",
                 "--width", "8", "--inner-steps", "1", "--eval-inner-steps", "1", *SMALL, "--out", str(out)]) == 0, \
        capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert (config["dataset"], config["ways"], config["shots"], config["queries"]) == ("tiered_imagenet", 5, 1, 1)
    assert main(["evaluate", str(out / "checkpoint.pt"), "--episodes", "4", "--no-progress"]) == 0
    assert "5-way 1-shot" in capsys.readouterr().out
    exp = build_experiment(resolve_config(TrainConfig(dataset="tiered_imagenet", data_root=str(root), width=8,
                                                      queries=1)))
    generator = torch.Generator().manual_seed(0)
    for mark, (split, classes) in enumerate(TIERED_SPLITS.items(), start=1):
        seen: set[int] = set()
        for _ in range(10):
            task = exp.sources[split].sample(4, generator)
            assert task.support_x.shape == task.query_x.shape == (4, 5, 3, 84, 84)
            pixels = torch.cat([task.support_x, task.query_x], 1)[:, :, :, 42, 42].mul(255).round().long()
            assert bool((pixels[..., 2] == mark).all()), split                 # this split's file, no other
            ids, labels = pixels[..., 0] + 256 * pixels[..., 1], torch.cat([task.support_y, task.query_y], 1)
            for t in range(4):                                                 # label y <-> one class, 5 classes
                by_label = [set(ids[t][labels[t] == y].tolist()) for y in range(5)]
                assert all(len(c) == 1 for c in by_label) and len(set.union(*by_label)) == 5
            seen |= set(ids.flatten().tolist())
        assert max(seen) < classes and len(seen) > MINI_SPLITS[split], (split, len(seen))


def test_random_crop_flip_moves_and_mirrors_each_image_on_its_own():
    images = torch.rand(64, 3, 8, 8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == images.shape
    same = [torch.equal(o, i) for o, i in zip(out, images)]
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    assert 0 < sum(same) + sum(flipped) < 64                           # some untouched or only mirrored, most cropped
    assert not torch.equal(random_crop_flip(images, torch.Generator().manual_seed(1), padding=2), out)
    assert torch.equal(random_crop_flip(images, torch.Generator().manual_seed(0), padding=2), out)   # reproducible
    border = random_crop_flip(torch.ones(1, 1, 6, 6), torch.Generator().manual_seed(3), padding=3)
    assert set(border.unique().tolist()) <= {0.0, 1.0}                 # zero padding, values never mixed
