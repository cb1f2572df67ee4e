"""``metafunc train --dataset cifar_fs | fc100 | mini_imagenet | tiered_imagenet`` with ``--backbone conv4 |
resnet12`` runs end to end on small files made in the exact formats (``tests/test_image_benchmarks.py`` builds
them), with the papers' defaults, and augments metric learners' training episodes on the device."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from test_image_benchmarks import mini_csv_root, write_tarball

import metafunc.data as data
from metafunc.cli import main
from metafunc.data import AugmentedSource, random_crop_flip
from metafunc.train import TrainConfig, build_experiment, resolve_config

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
    for name in ("cifar_fs_samplers", "fc100_samplers"):     # the made-up tarball has not the official md5
        monkeypatch.setattr(data, name, functools.partial(getattr(data, name), check_md5=False))
    for dataset in ("cifar_fs", "fc100"):
        out = tmp_path / dataset
        assert main(["train", "--dataset", dataset, "--data-root", str(tmp_path / "cifar"), "--algorithm", "protonet",
                     "--width", "8", *SMALL, "--out", str(out)]) == 0, capsys.readouterr().err
        exp = build_experiment(resolve_config(TrainConfig(dataset=dataset, data_root=str(tmp_path / "cifar"),
                                                          algorithm="protonet", width=8, queries=1)))
        assert isinstance(exp.sources["train"], AugmentedSource) and not isinstance(exp.sources["test"],
                                                                                    AugmentedSource)
        assert exp.sources["train"].sample(2, torch.Generator().manual_seed(0)).support_x.shape == (2, 5, 3, 32, 32)


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
