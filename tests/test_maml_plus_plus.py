"""MAML++ (Antoniou et al., 2019): its meta-gradient equals a plain ``torch.autograd`` loop written here on torch's own
modules (``nn.BatchNorm2d``) in float64, for the full learner and each part alone, with and without ``vmap``; the
multi-step loss weights follow the paper's annealing; the learned rates learn; the first-order phase is fomaml."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from learner_cases import classification_tasks
from reference import reference_meta_gradient, relative_error, torch_conv4
from torch import nn
from torch.func import functional_call

from metafunc import LEARNERS, convert_norm_layers, fomaml, functionalize, maml, maml_plus_plus, meta_batch, models
from metafunc.algorithms import msl_weights

LR, STEPS, EPOCH, MSL_EPOCHS = 0.3, 3, 2, 5
# id -> options; every part alone, all of them, and none (plain MAML). The epoch is inside the MSL annealing.
VARIANTS = {
    "full": dict(multi_step_loss=True, per_step_bn=True, learned_lrs=True, first_order_epochs=0),
    "msl": dict(multi_step_loss=True, per_step_bn=False, learned_lrs=False, first_order_epochs=0),
    "per_step_bn": dict(multi_step_loss=False, per_step_bn=True, learned_lrs=False, first_order_epochs=0),
    "lslr": dict(multi_step_loss=False, per_step_bn=False, learned_lrs=True, first_order_epochs=0),
    "first_order": dict(multi_step_loss=False, per_step_bn=False, learned_lrs=False, first_order_epochs=EPOCH + 1),
    "full_first_order": dict(multi_step_loss=True, per_step_bn=True, learned_lrs=True, first_order_epochs=EPOCH + 1),
    "none": dict(multi_step_loss=False, per_step_bn=False, learned_lrs=False, first_order_epochs=0),
}


def paper_msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """The paper's ``get_per_step_loss_importance_vector``, written out again."""
    weights = [1.0 / steps] * steps
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    for i in range(steps - 1):
        weights[i] = max(weights[i] - epoch * decay, floor)
    weights[-1] = min(weights[-1] + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return weights


def reference_objective(module: nn.Module, params: dict, task, *, multi_step_loss: bool, per_step_bn: bool,
                        learned_lrs: bool, first_order_epochs: int) -> torch.Tensor:
    """One task's MAML++ objective on a torch module, as the authors' ``forward`` computes it."""
    support_x, support_y, query_x, query_y = task
    norms = [f"{prefix}.{p}" for prefix, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)
             for p in ("weight", "bias")] if per_step_bn else []
    first_order = EPOCH < first_order_epochs
    fast = {k: v for k, v in params.items() if "/" not in k}
    adapted = [k for k in fast if k not in norms]
    query_losses = []
    for i in range(STEPS):
        if i > 0:
            fast.update({n: params[f"per_step/{i}/{n}"] for n in norms})
        support_loss = F.cross_entropy(functional_call(module, fast, (support_x,)), support_y)
        grads = torch.autograd.grad(support_loss, [fast[k] for k in adapted], create_graph=not first_order)
        for k, g in zip(adapted, grads):
            lr = params[f"inner_lr/{k}"][i] if learned_lrs else LR
            fast[k] = fast[k] - lr * (g.detach() if first_order else g)
        query_losses.append(F.cross_entropy(functional_call(module, fast, (query_x,)), query_y))
    if not (multi_step_loss and EPOCH < MSL_EPOCHS):
        return query_losses[-1]
    return sum(w * q for w, q in zip(paper_msl_weights(STEPS, EPOCH, MSL_EPOCHS), query_losses))


def reference_gradient(module: nn.Module, params: dict, tasks, **options) -> dict:
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    n = tasks[0].shape[0]
    objective = sum(reference_objective(module, leaves, [t[i] for t in tasks], **options) for i in range(n)) / n
    grads = torch.autograd.grad(objective, list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}


def metafunc_gradient(learner, params: dict, tasks, *, mode: str) -> dict:
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    meta_batch(learner.meta_loss, mode=mode)(leaves, tasks)[0].backward()
    return {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in leaves.items()}


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    module = torch_conv4(2, width=4, image_size=28, norm="batch").to(torch.float64)
    tasks = classification_tasks(ways=2, shots=1, queries=2, image_size=28)(2, torch.Generator().manual_seed(seed))
    return module, tasks.to(dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _case(variant: str):
    module, tasks = _setup()
    options = VARIANTS[variant]
    model, params = functionalize(convert_norm_layers(module))
    learner = maml_plus_plus(model, inner_lr=LR, steps=STEPS, epoch=EPOCH, msl_epochs=MSL_EPOCHS, **options)
    # Distinct rates per step and per-step norm copies unlike the base ones, so a wrong pairing would show.
    g = torch.Generator().manual_seed(1)
    meta_params = {k: (v * (0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype)) if "/" in k else v).detach()
                   for k, v in learner.init(params).items()}
    return module, learner, meta_params, tasks, reference_gradient(module, meta_params, tasks, **options)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_meta_gradient_equals_a_torch_autograd_reference_on_batchnorm2d(variant, mode):
    module, learner, params, tasks, reference = _case(variant)
    assert sum(float(g.norm()) for g in reference.values()) > 0
    assert relative_error(metafunc_gradient(learner, params, tasks, mode=mode), reference) < 1e-10


def test_the_meta_parameters_hold_per_step_norm_copies_and_per_step_rates():
    module, learner, params, _, reference = _case("full")
    norms = [k for k, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(k for k in params if k.startswith("per_step/")) == sorted(
        f"per_step/{i}/{n}.{p}" for i in range(1, STEPS) for n in norms for p in ("weight", "bias"))
    rates = {k: v for k, v in params.items() if k.startswith("inner_lr/")}
    assert sorted(rates) == sorted(f"inner_lr/{k}" for k in params if "/" not in k
                                   and not any(k.startswith(n + ".") for n in norms))
    assert all(v.shape == (STEPS,) for v in rates.values())
    fresh = learner.init(functionalize(convert_norm_layers(module))[1])
    assert all(torch.equal(fresh[k], torch.full((STEPS,), LR, dtype=torch.float64)) for k in rates)
    assert all(torch.equal(fresh[k], fresh[k.split("/", 2)[2]]) for k in fresh if k.startswith("per_step/"))
    # every copy of every norm parameter and every rate of every step gets a gradient
    for k in list(rates) + [k for k in params if k.startswith("per_step/")]:
        assert bool((reference[k] != 0).all()), k


def test_learned_rates_receive_gradients_in_the_first_order_phase_too():
    _, learner, params, tasks, reference = _case("full_first_order")
    grads = metafunc_gradient(learner, params, tasks, mode="vmap")
    assert relative_error(grads, reference) < 1e-10
    assert all(bool((g != 0).all()) for k, g in grads.items() if k.startswith("inner_lr/"))


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_the_first_order_phase_is_fomaml(mode):
    module, tasks = _setup()
    model, params = functionalize(convert_norm_layers(module))
    plus = maml_plus_plus(model, inner_lr=LR, steps=STEPS, epoch=1, first_order_epochs=2, multi_step_loss=False,
                          per_step_bn=False, learned_lrs=False)
    want = metafunc_gradient(fomaml(model, inner_lr=LR, steps=STEPS), params, tasks, mode=mode)
    reference = reference_meta_gradient(module, params, tasks, algorithm="fomaml", inner_lr=LR, steps=STEPS,
                                        loss="cross_entropy")
    got = metafunc_gradient(plus, plus.init(params), tasks, mode=mode)
    assert relative_error(got, want) < 1e-12 and relative_error(got, reference) < 1e-10
    assert not plus.second_order
    # from epoch 2 on: second order, plain MAML
    later = maml_plus_plus(model, inner_lr=LR, steps=STEPS, epoch=2, first_order_epochs=2, multi_step_loss=False,
                           per_step_bn=False, learned_lrs=False)
    maml_grads = metafunc_gradient(maml(model, inner_lr=LR, steps=STEPS), params, tasks, mode=mode)
    assert later.second_order and relative_error(metafunc_gradient(later, params, tasks, mode=mode), maml_grads) < 1e-12
    assert relative_error(got, maml_grads) > 1e-6


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("msl_epochs", [1, 10, 15])
def test_msl_weights_follow_the_papers_annealing(steps, msl_epochs):
    for epoch in range(msl_epochs + 3):
        got = msl_weights(steps, epoch, msl_epochs)
        assert got == pytest.approx(paper_msl_weights(steps, epoch, msl_epochs), abs=1e-15)
    assert msl_weights(steps, 0, msl_epochs) == pytest.approx([1 / steps] * steps)


def test_msl_weights_values():
    assert msl_weights(5, 0, 10) == pytest.approx([0.2] * 5)
    assert msl_weights(5, 5, 10) == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.6])
    assert msl_weights(5, 9, 10) == pytest.approx([0.02, 0.02, 0.02, 0.02, 0.92])
    assert msl_weights(5, 40, 10) == pytest.approx([0.006] * 4 + [0.976])   # the floor and the cap
    assert sum(msl_weights(5, 7, 10)) == pytest.approx(1.0)


def test_after_the_msl_epochs_the_objective_is_the_last_query_loss():
    module, tasks = _setup()
    model, params = functionalize(convert_norm_layers(module))
    during = maml_plus_plus(model, inner_lr=LR, steps=STEPS, epoch=MSL_EPOCHS - 1, msl_epochs=MSL_EPOCHS)
    after = maml_plus_plus(model, inner_lr=LR, steps=STEPS, epoch=MSL_EPOCHS, msl_epochs=MSL_EPOCHS)
    meta_params = after.init(params)
    loss_after, metrics_after = meta_batch(after.meta_loss)(meta_params, tasks)
    loss_during, metrics_during = meta_batch(during.meta_loss)(meta_params, tasks)
    assert torch.allclose(loss_after, metrics_after["loss"], rtol=1e-14)
    assert torch.allclose(metrics_during["loss"], metrics_after["loss"], rtol=1e-14)
    assert not torch.allclose(loss_during, loss_after, rtol=1e-6)


def test_with_every_part_off_it_is_maml():
    module, tasks = _setup()
    model, params = functionalize(convert_norm_layers(module))
    plain = maml_plus_plus(model, inner_lr=LR, steps=STEPS, multi_step_loss=False, per_step_bn=False,
                           learned_lrs=False)
    assert sorted(plain.init(params)) == sorted(params)
    for mode in ("vmap", "loop"):
        got = metafunc_gradient(plain, params, tasks, mode=mode)
        want = metafunc_gradient(maml(model, inner_lr=LR, steps=STEPS), params, tasks, mode=mode)
        assert relative_error(got, want) < 1e-12


def test_evaluate_past_the_trained_steps_reuses_the_last_copies_and_rates():
    _, learner, params, tasks, _ = _case("full")
    task = tasks.task_at(0)
    phi, losses = learner.adapt(params, task.support_x, task.support_y, steps=STEPS + 2)
    assert losses.shape == (STEPS + 2,)
    last = {k: params[f"per_step/{STEPS - 1}/{k}"] for k in phi if f"per_step/{STEPS - 1}/{k}" in params}
    assert last and all(torch.equal(phi[k], v) for k, v in last.items())
    loss, _ = learner.evaluate(params, task, steps=0)
    base = {k: v for k, v in params.items() if "/" not in k}
    assert torch.allclose(loss, F.cross_entropy(learner.model(base, task.query_x), task.query_y), rtol=1e-14)


def test_a_model_without_norm_layers_has_no_copies_and_trains_from_the_registry():
    model, params = functionalize(models.mlp(4, (8,), 3))
    learner = LEARNERS["maml_plus_plus"].build(model, inner_lr=0.1, steps=2, loss="cross_entropy", ways=3)
    meta_params = learner.init(params)
    assert not any(k.startswith("per_step/") for k in meta_params)
    assert sorted(k for k in meta_params if k.startswith("inner_lr/")) == sorted(f"inner_lr/{k}" for k in params)


@pytest.mark.parametrize(("options", "error", "match"), [
    (dict(inner_lr=0.0), ValueError, r"maml_plus_plus: inner_lr must be > 0 \(got 0.0\)"),
    (dict(steps=0), ValueError, r"maml_plus_plus: steps must be >= 1 \(got 0\)"),
    (dict(multi_step_loss=1), TypeError, r"maml_plus_plus: multi_step_loss must be a bool \(got 1\)"),
    (dict(per_step_bn="yes"), TypeError, r"maml_plus_plus: per_step_bn must be a bool \(got 'yes'\)"),
    (dict(msl_epochs=0), ValueError, r"maml_plus_plus: msl_epochs must be >= 1 \(got 0\)"),
    (dict(first_order_epochs=-1), ValueError, r"maml_plus_plus: first_order_epochs must be >= 0 \(got -1\)"),
    (dict(epoch=1.5), TypeError, r"maml_plus_plus: epoch must be an int \(got float 1.5\)"),
    (dict(loss="l2"), ValueError, r"maml_plus_plus: loss must be 'cross_entropy', 'mse' or a callable"),
])
def test_bad_options_are_refused_eagerly(options, error, match):
    model, _ = functionalize(models.mlp())
    with pytest.raises(error, match=match):
        maml_plus_plus(model, **options)


def test_meta_parameters_without_init_are_refused_with_the_fix():
    module, tasks = _setup()
    model, params = functionalize(convert_norm_layers(module))
    learner = maml_plus_plus(model, inner_lr=LR, steps=2)
    with pytest.raises(ValueError, match=r"maml_plus_plus: the meta-parameters lack \['per_step/1/.*build them with "
                                         r"learner.init\(params\)"):
        meta_batch(learner)(params, tasks)
