"""Episodes with varying ways and shots in one meta-batch (issue 20, part 4): padded, batched under vmap, exact.

A padded meta-batch's meta-step equals the mean over its tasks of each task run alone, unpadded (the loss, the
metrics and the float64 meta-gradient, to 1e-10), in vmap and loop mode; the sampler draws the promised episodes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metafunc import (
    BatchNorm,
    LayerNorm,
    Task,
    fo_proto_maml,
    fomaml,
    functionalize,
    maml,
    matching_net,
    meta_batch,
    meta_value_and_grad,
    pad_tasks,
    proto_maml,
    protonet,
    way_masked_cross_entropy,
)
from metafunc.core.padding import mask_logits, masked_cross_entropy, padding_mask, task_ways
from metafunc.core.tree import tree_relative_error
from metafunc.data import VariableEpisodeSampler
from metafunc.text.clinc import clinc_variable_samplers

MAX_WAYS = 5


def _encoder(out: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), LayerNorm(8), nn.Tanh(), nn.Linear(8, out))


def _tasks(seed: int = 0, meta_batch: int = 4) -> list[Task]:
    """Unpadded tasks of 2..5 ways, 1..4 shots per class, 2 queries per class, on random features."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(200, 4, generator=g, dtype=torch.float64)
    sampler = VariableEpisodeSampler(data, torch.arange(200) % 10, min_ways=2, max_ways=MAX_WAYS, min_shots=1,
                                     max_shots=4, queries=2, dtype=torch.float64)
    tasks = sampler.sample_tasks(meta_batch, g)
    ways = [int(t.support_y.max()) + 1 for t in tasks]
    assert len(set(ways)) > 1 and len({t.support_y.numel() for t in tasks}) > 1  # really variable
    return tasks


def _alone(per_task, params, tasks: list[Task]) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
    """The mean over tasks of each task's loss, metrics and gradient, each task alone and unpadded, with a plain
    ``torch.autograd.grad`` (no meta_batch, no vmap)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    total, grads, metrics = 0.0, {k: torch.zeros_like(v) for k, v in params.items()}, {}
    for task in tasks:
        loss, m = per_task(leaves, task)
        g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        for (k, v), gk in zip(leaves.items(), g):
            grads[k] += (gk if gk is not None else torch.zeros_like(v)) / len(tasks)
        total += float(loss.detach()) / len(tasks)
        for name, value in m.items():
            metrics[name] = metrics.get(name, 0.0) + float(value) / len(tasks)
    return total, grads, metrics


LEARNERS = {
    "protonet": (lambda m: protonet(m), 6),
    "proto_maml": (lambda m: proto_maml(m, inner_lr=0.3, head_lr=0.5, steps=2), 6),
    "fo_proto_maml": (lambda m: fo_proto_maml(m, inner_lr=0.3, steps=2), 6),
    "fo_proto_maml-two_pass": (lambda m: fo_proto_maml(m, inner_lr=0.3, steps=2, two_pass=True), 6),
    "fo_proto_maml-two_pass-chunks": (lambda m: fo_proto_maml(m, inner_lr=0.3, steps=2, two_pass=True,
                                                              query_chunk_size=3), 6),
    "maml": (lambda m: maml(m, inner_lr=0.3, steps=2), MAX_WAYS),
    "maml-way_masked": (lambda m: maml(m, inner_lr=0.3, steps=2, loss=way_masked_cross_entropy), MAX_WAYS),
    "fomaml-way_masked": (lambda m: fomaml(m, inner_lr=0.3, steps=2, loss=way_masked_cross_entropy), MAX_WAYS),
}


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("name", list(LEARNERS))
def test_a_padded_meta_batch_equals_each_task_alone(float64, name, mode):
    make, out = LEARNERS[name]
    model, params = functionalize(_encoder(out))
    learner = make(model)
    tasks = _tasks()
    loss, metrics, grads = meta_value_and_grad(learner, mode=mode)(params, pad_tasks(tasks))
    want_loss, want_grads, want_metrics = _alone(learner.meta_loss, params, tasks)
    assert abs(float(loss) - want_loss) <= 1e-10 * abs(want_loss)
    assert tree_relative_error(grads, want_grads) <= 1e-10
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert float(metrics["accuracy"]) == pytest.approx(want_metrics["accuracy"], abs=1e-12)
    assert float(metrics["loss"]) == pytest.approx(want_metrics["loss"], rel=1e-10)


def test_way_masked_maml_scores_a_task_among_its_own_classes(float64):
    """A 2-way task on a 5-output head: its loss is the cross-entropy over the first two outputs only."""
    model, params = functionalize(_encoder(MAX_WAYS))
    task = next(t for t in _tasks() if int(t.support_y.max()) + 1 < MAX_WAYS)
    ways = int(task.support_y.max()) + 1
    learner = maml(model, inner_lr=0.3, loss=way_masked_cross_entropy)
    loss, _ = learner.evaluate(params, task, steps=0)  # the query loss before adaptation
    want = nn.functional.cross_entropy(model(params, task.query_x)[:, :ways], task.query_y)
    assert float(loss) == pytest.approx(float(want.detach()), rel=1e-12)


def test_masked_logits_keep_every_gradient_finite_to_second_order(float64):
    """The masked classes get no gradient of any order and no NaN: grad of grad through the masked loss."""
    logits = torch.randn(3, 6, 5, dtype=torch.float64)
    y = torch.tensor([[0, 1, 2, 1, -1, -1], [0, 1, 0, 1, 0, 1], [3, 0, 1, 2, 4, -1]])

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return masked_cross_entropy(x, y, ways=task_ways(y))

    def grad_norm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (torch.func.grad(loss)(x, y) ** 2).sum()

    second = torch.func.vmap(torch.func.grad(grad_norm))(logits, y)
    assert torch.isfinite(second).all()
    assert float(second[1, :, 2:].abs().max()) == 0.0 and float(second[0, 4:].abs().max()) == 0.0
    alone = torch.func.grad(grad_norm)(logits[0, :4, :3], y[0, :4])
    assert torch.allclose(second[0, :4, :3], alone, rtol=1e-12, atol=1e-15)


def test_without_padding_the_masks_change_nothing(float64):
    logits, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    assert torch.equal(mask_logits(logits, 3), logits)
    assert torch.equal(masked_cross_entropy(logits, y), nn.functional.cross_entropy(logits, y))


def test_pad_tasks_builds_the_convention_and_refuses_bad_input():
    tasks = _tasks(meta_batch=3)
    padded = pad_tasks(tasks)
    for i, task in enumerate(tasks):
        n = task.support_y.numel()
        assert torch.equal(padded.support_y[i, :n], task.support_y)
        assert (padded.support_y[i, n:] == -1).all() and padding_mask(padded.support_y[i]).sum() == padded.support_y.shape[1] - n
        assert torch.equal(padded.support_x[i, n:], task.support_x[:1].expand_as(padded.support_x[i, n:]))
    with pytest.raises(TypeError, match=r"^pad_tasks: tasks must be a non-empty list of unbatched metafunc.Task"):
        pad_tasks([])
    with pytest.raises(ValueError, match=r"^pad_tasks: task 1: support_y has negative labels \(min -1\)"):
        pad_tasks([tasks[0], padded.task_at(0)._replace(support_y=padded.support_y[0])])
    with pytest.raises(ValueError, match=r"^pad_tasks: task 1: query_x has examples of shape \(3,\)"):
        pad_tasks([tasks[0], tasks[1]._replace(query_x=tasks[1].query_x[:, :3])])


def test_a_model_with_batch_statistics_refuses_a_padded_meta_batch(float64):
    torch.manual_seed(0)
    model, params = functionalize(nn.Sequential(nn.Linear(4, 8), BatchNorm(8), nn.Tanh(), nn.Linear(8, MAX_WAYS)))
    padded = pad_tasks(_tasks())
    message = (r"the meta-batch is padded \(labels -1\) but the model normalises with batch statistics in "
               r"\['1 \(BatchNorm\)'\], which the padding examples would change; use a per-example norm")
    for learner in (protonet(model), proto_maml(model), maml(model)):
        with pytest.raises(ValueError, match=rf"^{learner.name}: {message}"):
            meta_value_and_grad(learner, mode="loop")(params, padded)
    unpadded = Task(*(t[:, :4] for t in pad_tasks([t for t in _tasks() if t.support_y.numel() >= 4])))
    meta_value_and_grad(maml(model), mode="loop")(params, unpadded)  # no padding: batch statistics are fine


def test_learners_that_cannot_mask_padding_refuse_it(float64):
    model, params = functionalize(_encoder(MAX_WAYS))
    padded = pad_tasks(_tasks())
    with pytest.raises(ValueError, match=r"^matching_net: the meta-batch is padded \(labels -1, metafunc.pad_tasks\) "
                                         r"but matching_net does not mask padding examples"):
        meta_batch(matching_net(model))(params, padded)
    custom = maml(model, loss=lambda p, t: nn.functional.cross_entropy(p, t))
    with pytest.raises(ValueError, match=r"^maml: the meta-batch is padded .* but the loss is a custom callable"):
        meta_batch(custom)(params, padded)


def test_variable_ways_without_padding_are_exact_for_protonet_and_refused_by_matching_net(float64):
    """A 2-way 3-shot and a 3-way 2-shot task have equal sizes: no padding, only absent classes to mask."""
    torch.manual_seed(0)
    model, params = functionalize(nn.Sequential(nn.Linear(4, 8), nn.Tanh()))
    tasks = [Task(torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 1, 1]), torch.randn(4, 4), torch.tensor([0, 1, 1, 0])),
             Task(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]), torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))]
    batch = pad_tasks(tasks)
    assert not (batch.support_y < 0).any() and not (batch.query_y < 0).any()
    loss, _, grads = meta_value_and_grad(protonet(model), mode="vmap")(params, batch)
    want_loss, want_grads, _ = _alone(protonet(model).meta_loss, params, tasks)
    assert abs(float(loss) - want_loss) <= 1e-10 * abs(want_loss) and tree_relative_error(grads, want_grads) <= 1e-10
    with pytest.raises(ValueError, match=r"^matching_net: the support set of task 0 has no example of class 2 "
                                         r"\(ways=3\)"):
        meta_batch(matching_net(model))(params, batch)


def test_padding_before_a_real_label_is_a_bad_label(float64):
    model, params = functionalize(_encoder(MAX_WAYS))
    padded = pad_tasks(_tasks())
    stray = padded.query_y.clone()
    stray[0, 0] = -1
    with pytest.raises(ValueError, match=r"^protonet: task.query_y has negative labels \(min -1\); relabel"):
        meta_batch(protonet(model))(params, padded._replace(query_y=stray))
    with pytest.raises(ValueError, match=r"^maml: task.query_y has labels in \[-1, "):
        meta_batch(maml(model))(params, padded._replace(query_y=stray))
    high = padded.query_y.clone()
    high[0, 0] = MAX_WAYS - 1 if int(padded.support_y[0].max()) < MAX_WAYS - 1 else 0
    if int(high[0, 0]) != 0:
        with pytest.raises(ValueError, match=r"^maml: task 0 has query labels beyond its support labels"):
            meta_batch(maml(model, loss=way_masked_cross_entropy))(params, padded._replace(query_y=high))


def _check_episodes(tasks: Task, *, min_ways: int, max_ways: int, min_shots: int, max_shots: int, queries: int,
                    max_support: int) -> set[int]:
    seen = set()
    for i in range(tasks.num_tasks):
        s, q = tasks.support_y[i], tasks.query_y[i]
        s, q = s[s >= 0], q[q >= 0]
        ways = int(s.max()) + 1
        seen.add(ways)
        assert min_ways <= ways <= max_ways and s.numel() <= max_support
        shots = torch.bincount(s, minlength=ways)
        assert int(shots.min()) >= min_shots and int(shots.max()) <= max_shots
        assert torch.equal(torch.bincount(q, minlength=ways), torch.full((ways,), queries))
    return seen


def test_the_sampler_draws_the_promised_episodes_reproducibly():
    data, labels = torch.randn(300, 3), torch.arange(300) % 12
    options = dict(min_ways=3, max_ways=7, min_shots=2, max_shots=6, queries=3, max_support=20)
    sampler = VariableEpisodeSampler(data, labels, **options)  # type: ignore[arg-type]
    tasks = sampler.sample(40, torch.Generator().manual_seed(0))
    assert _check_episodes(tasks, **options) == set(range(3, 8))  # type: ignore[arg-type]
    again = sampler.sample(40, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(tasks, again))
    other = sampler.sample(40, torch.Generator().manual_seed(1))
    assert not torch.equal(tasks.support_y, other.support_y)
    assert (tasks.support_y.shape[1] <= 20) and tasks.query_y.shape[1] == 7 * 3


@pytest.mark.parametrize("options, error, message", [
    (dict(min_ways=1), ValueError, r"min_ways must be >= 2 \(got 1\)"),
    (dict(min_ways=6, max_ways=4), ValueError, r"max_ways must be >= min_ways \(got max_ways=4, min_ways=6\)"),
    (dict(min_shots=3, max_shots=2), ValueError, r"max_shots must be >= min_shots"),
    (dict(queries=0), ValueError, r"queries must be >= 1 \(got 0\)"),
    (dict(max_support=3), ValueError, r"max_support=3 cannot hold max_ways \* min_shots = 4 \* 1 = 4"),
    (dict(max_ways=13), ValueError, r"max_ways=13 but the data set has only 12 classes"),
    (dict(max_shots=30), ValueError, r"max_shots \+ queries = 30 \+ 2 but some classes have only 25 examples"),
    (dict(max_ways=2.5), TypeError, r"max_ways must be an int"),
])
def test_the_sampler_refuses_bad_options_eagerly(options, error, message):
    base = dict(min_ways=2, max_ways=4, min_shots=1, max_shots=3, queries=2)
    with pytest.raises(error, match=rf"^VariableEpisodeSampler: {message}"):
        VariableEpisodeSampler(torch.randn(300, 3), torch.arange(300) % 12, **{**base, **options})


def test_clinc150_variable_samplers_draw_valid_padded_episodes(data_root):
    def encode(texts):  # a toy encode: text length and vowel counts
        return torch.tensor([[len(t), sum(c in "aeiou" for c in t), t.count(" ")] for t in texts], dtype=torch.float)

    samplers = clinc_variable_samplers(encode, data_root / "clinc150", min_ways=3, max_ways=8, max_shots=5,
                                       queries=4, max_support=25)
    for split in ("train", "val", "test"):
        tasks = samplers[split].sample(16, torch.Generator().manual_seed(0))
        assert tasks.support_x.shape[-1] == 3 and tasks.support_x.dtype == torch.float32
        assert len(_check_episodes(tasks, min_ways=3, max_ways=8, min_shots=1, max_shots=5, queries=4,
                                   max_support=25)) > 1
    encoder, params = functionalize(nn.Sequential(nn.Linear(3, 8), nn.Tanh()))
    loss, metrics, _ = meta_value_and_grad(protonet(encoder), mode="vmap")(params, tasks)
    assert torch.isfinite(loss) and 0.0 <= float(metrics["accuracy"]) <= 1.0
    with pytest.raises(ValueError, match=r"^clinc_variable_samplers: max_ways must be >= min_ways"):
        clinc_variable_samplers(encode, data_root / "clinc150", min_ways=5, max_ways=4)


def test_the_docs_page_example_runs(capsys):
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "variable-episodes.md"
    block = re.search(r"```python\n(.*?)```", page.read_text(), re.S).group(1)  # type: ignore[union-attr]
    exec(compile(block, str(page), "exec"), {})  # noqa: S102 - the page's example, as a user runs it
    out = capsys.readouterr().out
    assert re.search(r"loss \d+\.\d{3}, accuracy [01]\.\d{3}", out), out
