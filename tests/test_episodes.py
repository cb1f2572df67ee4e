"""EpisodeSampler: shapes, label consistency, disjoint support/query, rotations as classes, reproducibility, errors,
and a meta-gradient on sampled episodes equal to a float64 autograd loop (vmap and loop)."""

from __future__ import annotations

import pytest
import torch
from reference import reference_meta_gradient

from metafunc import functionalize, maml, meta_batch, models
from metafunc.core.tree import tree_relative_error
from metafunc.data import EpisodeSampler, SplitSamplers
from metafunc.data.episodes import check_class_sizes


def coded_data(classes: int = 10, per_class: int = 6, size: int = 4):
    """Images whose pixels encode (class, example): pixel[0,0] = class, pixel[0,1] = example index, rest distinct."""
    n = classes * per_class
    labels = torch.arange(n) % classes
    images = torch.zeros(n, 1, size, size)
    images[:, 0, 0, 0] = labels.float()
    images[:, 0, 0, 1] = torch.arange(n).float()
    images[:, 0, size - 1, size - 1] = -1.0  # a corner marker that shows the rotation
    return images, labels


def unrotate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(original image, k) where x == rot90(original, k); finds the corner marker."""
    for k in range(4):
        back = torch.rot90(x, -k, dims=(-2, -1))
        if back[..., -1, -1].item() == -1.0:
            return back, torch.tensor(k)
    raise AssertionError("no rotation found")


def test_shapes_dtypes_and_label_counts():
    images, labels = coded_data()
    sampler = EpisodeSampler(images, labels, ways=4, shots=2, queries=3)
    task = sampler.sample(5, torch.Generator().manual_seed(0))
    assert task.support_x.shape == (5, 8, 1, 4, 4) and task.query_x.shape == (5, 12, 1, 4, 4)
    assert task.support_y.dtype == torch.int64 and task.query_y.dtype == torch.int64
    assert task.support_x.dtype == torch.float32
    for t in range(5):
        assert torch.equal(torch.bincount(task.support_y[t], minlength=4), torch.full((4,), 2))
        assert torch.equal(torch.bincount(task.query_y[t], minlength=4), torch.full((4,), 3))


def test_each_label_is_one_class_and_support_query_are_disjoint():
    images, labels = coded_data(classes=12, per_class=7)
    sampler = EpisodeSampler(images, labels, ways=5, shots=3, queries=4)
    task = sampler.sample(40, torch.Generator().manual_seed(1))
    for t in range(40):
        sx, sy = task.support_x[t, :, 0, 0], task.support_y[t]
        qx, qy = task.query_x[t, :, 0, 0], task.query_y[t]
        cls = torch.cat([sx[:, 0], qx[:, 0]])
        lab = torch.cat([sy, qy])
        mapping = {int(l): {float(c) for c in cls[lab == l]} for l in range(5)}
        assert all(len(v) == 1 for v in mapping.values())  # one class per label
        assert len({next(iter(v)) for v in mapping.values()}) == 5  # distinct classes
        ids = torch.cat([sx[:, 1], qx[:, 1]])
        assert ids.unique().numel() == ids.numel()  # no example used twice in a task
        # every example really is an example of its class in the data set
        assert torch.equal(labels[ids.long()].float(), cls)


def test_labels_are_shuffled_and_classes_uniform():
    images, labels = coded_data(classes=6, per_class=3)
    sampler = EpisodeSampler(images, labels, ways=3, shots=1, queries=1)
    task = sampler.sample(3000, torch.Generator().manual_seed(2))
    cls_of_label0 = task.support_x[:, :, 0, 0, 0][task.support_y == 0]
    counts = torch.bincount(cls_of_label0.long(), minlength=6).float()
    # label 0 lands on each of the 6 classes with probability 1/6: 500 +- 3.5 sigma (sigma ~ 20)
    assert counts.min() > 430 and counts.max() < 570, counts
    # the support order is shuffled too: label 0 is not always first
    assert 0.2 < (task.support_y[:, 0] == 0).float().mean() < 0.47


def test_seeded_generator_reproduces_episodes():
    images, labels = coded_data()
    sampler = EpisodeSampler(images, labels, ways=3, shots=2, queries=2, rotations=True)
    a = sampler.sample(4, torch.Generator().manual_seed(7))
    b = sampler.sample(4, torch.Generator().manual_seed(7))
    c = sampler.sample(4, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.support_x, c.support_x)


def test_rotations_are_extra_classes():
    images, labels = coded_data(classes=3, per_class=6)
    sampler = EpisodeSampler(images, labels, ways=6, shots=2, queries=2, rotations=True)
    assert sampler.num_classes == 12
    task = sampler.sample(50, torch.Generator().manual_seed(3))
    seen_rotations = set()
    for t in range(50):
        xs = torch.cat([task.support_x[t], task.query_x[t]])
        ys = torch.cat([task.support_y[t], task.query_y[t]])
        keys = {}
        for x, y in zip(xs, ys):
            orig, k = unrotate(x)
            idx = int(orig[0, 0, 1])
            assert torch.equal(orig, images[idx])  # the rotated image is a true rotation of a data set image
            keys.setdefault(int(y), set()).add((int(orig[0, 0, 0]), int(k)))
            seen_rotations.add(int(k))
        assert all(len(v) == 1 for v in keys.values())  # one (class, rotation) per label
        assert len({next(iter(v)) for v in keys.values()}) == 6
    assert seen_rotations == {0, 1, 2, 3}


def test_uint8_images_become_floats_in_unit_range():
    images = torch.randint(0, 256, (20, 1, 5, 5), dtype=torch.uint8)
    labels = torch.arange(20) % 4
    task = EpisodeSampler(images, labels, ways=2, shots=1, queries=1).sample(3, torch.Generator().manual_seed(0))
    assert task.support_x.dtype == torch.float32
    raw = task.support_x * 255
    assert torch.allclose(raw, raw.round(), atol=1e-4) and raw.min() >= 0 and raw.max() <= 255
    match = (images.float()[None] == raw[0, 0].round()[None, None]).flatten(2).all(-1)
    assert match.any()


def test_unequal_class_sizes_never_pick_padding():
    labels = torch.tensor([5] * 3 + [9] * 8 + [2] * 4)
    images = torch.arange(15).float()[:, None]
    sampler = EpisodeSampler(images, labels, ways=3, shots=1, queries=2)
    task = sampler.sample(200, torch.Generator().manual_seed(0))
    ids = torch.cat([task.support_x, task.query_x], 1)[..., 0].long()
    for t in range(200):
        assert ids[t].unique().numel() == 9
    assert torch.equal(torch.bincount(ids.flatten(), minlength=15) > 0, torch.ones(15, dtype=torch.bool))


def test_any_example_shape_and_dtype_option():
    sampler = EpisodeSampler(torch.randn(30, 7), torch.arange(30) % 3, ways=3, shots=2, queries=1,
                             dtype=torch.float64)
    task = sampler.sample(2, torch.Generator().manual_seed(0))
    assert task.support_x.shape == (2, 6, 7) and task.support_x.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(ways=11), ValueError, r"EpisodeSampler: ways = 11 but the data set has only 10 classes"),
        (dict(ways=3, rotations=True, shots=1, queries=1, images_shape=(60, 1, 4, 5)), ValueError, "square images"),
        (dict(shots=4, queries=3), ValueError, r"shots \+ queries = 4 \+ 3 = 7 but some classes have only 6"),
        (dict(ways=0), ValueError, "ways must be >= 1"),
        (dict(queries=0), ValueError, "queries must be >= 1"),
        (dict(shots=1.5), TypeError, "shots must be an int"),
        (dict(labels=torch.zeros(60)), TypeError, "labels must hold integer class ids"),
        (dict(labels=torch.zeros(59, dtype=torch.long)), ValueError, "one label per image"),
    ],
    ids=["too-many-ways", "rotations-not-square", "too-many-shots", "zero-ways", "zero-queries", "float-shots",
         "float-labels", "label-count"],
)
def test_errors(kwargs, error, match):
    images, labels = coded_data()
    if "images_shape" in kwargs:
        images = torch.zeros(kwargs.pop("images_shape"))
    labels = kwargs.pop("labels", labels)
    args = dict(ways=3, shots=1, queries=1) | kwargs
    with pytest.raises(error, match=match):
        EpisodeSampler(images, labels, **args)


def test_rotations_count_toward_ways():
    images, labels = coded_data(classes=3, per_class=4)
    EpisodeSampler(images, labels, ways=12, shots=1, queries=1, rotations=True)
    with pytest.raises(ValueError, match=r"only 12 classes \(with rotations\)"):
        EpisodeSampler(images, labels, ways=13, shots=1, queries=1, rotations=True)


def test_sample_errors():
    images, labels = coded_data()
    sampler = EpisodeSampler(images, labels, ways=3, shots=1, queries=1)
    with pytest.raises(ValueError, match="EpisodeSampler.sample: meta_batch must be >= 1"):
        sampler.sample(0, torch.Generator())
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sampler.sample(2, 0)


def _counting_builds(spec: dict[str, dict]) -> tuple[SplitSamplers, list[str]]:
    images, labels = coded_data()
    calls: list[str] = []

    def build(name: str):
        def make() -> EpisodeSampler:
            calls.append(name)
            return EpisodeSampler(images, labels, shots=1, queries=1, **spec[name])
        return make

    samplers = SplitSamplers({name: build(name) for name in spec}, ways={n: s["ways"] for n, s in spec.items()},
                             num_classes={name: 10 for name in spec})
    return samplers, calls


def test_split_samplers_build_each_split_once_on_first_use():
    samplers, calls = _counting_builds({"train": dict(ways=4, rotations=True), "val": dict(ways=11),
                                        "test": dict(ways=3)})
    # looking at the mapping builds nothing, and the impossible 11-way val split never raises unless it is read
    assert list(samplers) == ["train", "val", "test"] and len(samplers) == 3 and "val" in samplers
    assert "other" not in samplers and samplers.ways == {"train": 4, "val": 11, "test": 3} and calls == []
    assert samplers.built == () and "val: 11-way of 10 classes (not built)" in repr(samplers)
    test = samplers["test"]
    assert samplers["test"] is test and test.ways == 3 and calls == ["test"] and samplers.built == ("test",)
    task = test.sample(2, torch.Generator().manual_seed(0))
    direct = EpisodeSampler(*coded_data(), ways=3, shots=1, queries=1).sample(2, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(task, direct))  # the sampler a direct construction gives
    with pytest.raises(ValueError, match=r"EpisodeSampler: ways = 11 but the data set has only 10 classes"):
        samplers["val"]
    with pytest.raises(ValueError, match=r"ways = 11"):  # a failed build is not kept: it raises again
        samplers["val"]
    assert calls == ["test", "val", "val"] and samplers.built == ("test",)
    with pytest.raises(KeyError):
        samplers["other"]
    assert samplers.get("train").rotations and calls == ["test", "val", "val", "train"]


def test_split_samplers_build_once_under_threads():
    import threading

    samplers, calls = _counting_builds({"train": dict(ways=4, rotations=True)})
    got: list[EpisodeSampler] = []
    threads = [threading.Thread(target=lambda: got.append(samplers["train"])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert calls == ["train"] and len(got) == 8 and all(s is got[0] for s in got)


def test_split_samplers_need_the_same_splits_everywhere():
    with pytest.raises(ValueError, match=r"SplitSamplers: build, ways and num_classes must name the same splits "
                                         r"\(got \['train'\], \['train', 'val'\] and \['train'\]\)"):
        SplitSamplers({"train": lambda: None}, ways={"train": 5, "val": 5}, num_classes={"train": 8})


def test_check_class_sizes_matches_the_sampler():
    labels = torch.tensor([4, 4, 4, 9, 9, 7, 7, 7])
    ids, inverse, counts = check_class_sizes(labels, shots=1, queries=1)
    assert ids.tolist() == [4, 7, 9] and counts.tolist() == [3, 3, 2] and torch.equal(ids[inverse], labels)
    with pytest.raises(ValueError, match=r"^EpisodeSampler: shots \+ queries = 2 \+ 1 = 3 but some classes have only "
                                         r"2 examples \(e.g. class ids \[9\]\); lower shots or queries to at most 2"):
        check_class_sizes(labels, shots=2, queries=1)
    with pytest.raises(ValueError, match=r"^EpisodeSampler: the data set is empty \(no labels\)"):
        check_class_sizes(torch.zeros(0, dtype=torch.long), shots=1, queries=1)


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_meta_gradient_on_sampled_episodes_matches_autograd_loop(float64, algorithm):
    """Episodes from the sampler (float64, rotations) through a BatchNorm Conv-4: vmap == loop == autograd."""
    images = torch.rand(24, 1, 16, 16, dtype=torch.float64)
    labels = torch.arange(24) % 6
    sampler = EpisodeSampler(images, labels, ways=3, shots=1, queries=2, rotations=True, dtype=torch.float64)
    tasks = sampler.sample(3, torch.Generator().manual_seed(0))
    module = models.conv4(ways=3, width=4, image_size=16, norm="batch").double()
    model, params = functionalize(module)
    learner = maml(model, inner_lr=0.4, steps=2, adapt="head" if algorithm == "anil" else None)
    expected = reference_meta_gradient(module, params, list(tasks), algorithm=algorithm, inner_lr=0.4, steps=2,
                                       loss="cross_entropy", head="head")
    for mode in ("vmap", "loop"):
        grads = torch.autograd.grad(meta_batch(learner.meta_loss, mode=mode)(params, tasks)[0],
                                    list(params.values()))
        assert tree_relative_error(dict(zip(params, grads)), expected) < 1e-10, mode
