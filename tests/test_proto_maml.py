"""ProtoMAML, fo-ProtoMAML and the two-pass gradient: exact against a hand-written autograd loop in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_protonet import few_shot_tasks, leaves, meta_gradient, torch_encoder
from torch import nn
from torch.func import functional_call

from metafunc import (
    Task,
    convert_norm_layers,
    fo_proto_maml,
    functionalize,
    meta_batch,
    proto_maml,
    protonet,
    prototype_head,
)
from metafunc.algorithms.proto_maml import HEAD_BIAS, HEAD_WEIGHT
from metafunc.core.tree import tree_relative_error


def reference_task_loss(module, theta, task, *, ways, inner_lr, head_lr, steps, first_order, adapted=None):
    """One task's ProtoMAML objective written with torch.autograd.grad(create_graph=True) on the nn.Module."""
    xs, ys, xq, yq = task
    zs = functional_call(module, theta, (xs,))
    c = torch.stack([zs[ys == k].mean(0) for k in range(ways)])
    gamma_w, gamma_b = 2 * c, -(c ** 2).sum(1)
    names = [k for k in theta if adapted is None or adapted(k)]
    fast = {k: (v.detach().requires_grad_(True) if first_order else v) for k, v in theta.items()}
    w, b = gamma_w.detach().requires_grad_(True), gamma_b.detach().requires_grad_(True)
    for _ in range(steps):
        support = F.cross_entropy(functional_call(module, fast, (xs,)) @ w.T + b, ys)
        grads = torch.autograd.grad(support, [fast[k] for k in names] + [w, b], create_graph=not first_order)
        new = dict(fast)
        for k, g in zip(names, grads):
            new[k] = fast[k] - inner_lr * g
        w, b = w - head_lr * grads[-2], b - head_lr * grads[-1]
        if first_order:
            new = {k: v.detach().requires_grad_(True) for k, v in new.items()}
            w, b = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
        fast = new
    if first_order:
        fast = {k: theta[k] + (fast[k] - theta[k]).detach() for k in theta}
    w = gamma_w + (w - gamma_w).detach()
    b = gamma_b + (b - gamma_b).detach()
    return F.cross_entropy(functional_call(module, fast, (xq,)) @ w.T + b, yq)


def reference_meta_gradient(module, params, tasks, **kwargs):
    p = leaves(params)
    loss = sum(reference_task_loss(module, p, tasks.task_at(i), **kwargs) for i in range(tasks.num_tasks))
    loss = loss / tasks.num_tasks
    return loss.detach(), dict(zip(p, torch.autograd.grad(loss, list(p.values()))))


MODES = pytest.mark.parametrize("mode,chunk", [("vmap", None), ("vmap", 2), ("loop", None)],
                                ids=["vmap", "vmap-chunk2", "loop"])


@MODES
@pytest.mark.parametrize("steps,head_lr", [(1, 0.7), (2, 0.7), (2, 0.0)],
                         ids=["1-step", "2-steps", "2-steps-head-fixed"])  # head_lr=0: BOIL's inner loop
def test_second_order_equals_autograd_reference(float64, mode, chunk, steps, head_lr):
    module = torch_encoder()
    encoder, params = functionalize(convert_norm_layers(module))
    tasks = few_shot_tasks()
    learner = proto_maml(encoder, inner_lr=0.3, head_lr=head_lr, steps=steps)
    loss, _, grads = meta_gradient(learner, params, tasks, mode=mode, chunk_size=chunk)
    ref_loss, ref = reference_meta_gradient(module, params, tasks, ways=3, inner_lr=0.3, head_lr=head_lr,
                                            steps=steps, first_order=False)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert tree_relative_error(grads, ref) < 1e-10


@MODES
@pytest.mark.parametrize("two_pass", [False, True], ids=["single-graph", "two-pass"])
def test_first_order_equals_autograd_reference(float64, mode, chunk, two_pass):
    module = torch_encoder()
    encoder, params = functionalize(convert_norm_layers(module))
    tasks = few_shot_tasks()
    learner = fo_proto_maml(encoder, inner_lr=0.3, head_lr=0.7, steps=2, two_pass=two_pass)
    loss, _, grads = meta_gradient(learner, params, tasks, mode=mode, chunk_size=chunk)
    ref_loss, ref = reference_meta_gradient(module, params, tasks, ways=3, inner_lr=0.3, head_lr=0.7, steps=2,
                                            first_order=True)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert tree_relative_error(grads, ref) < 1e-10


@MODES
@pytest.mark.parametrize("adapt", [None, "3"], ids=["adapt-all", "adapt-top-layer"])
def test_two_pass_equals_single_graph(float64, mode, chunk, adapt):
    encoder, params = functionalize(convert_norm_layers(torch_encoder()))
    tasks = few_shot_tasks(num_tasks=4, shots=3)
    kwargs = dict(inner_lr=0.2, head_lr=0.5, steps=3, adapt=adapt)
    loss_1, metrics_1, single = meta_gradient(fo_proto_maml(encoder, **kwargs), params, tasks, mode=mode,
                                              chunk_size=chunk)
    loss_2, metrics_2, two = meta_gradient(fo_proto_maml(encoder, two_pass=True, **kwargs), params, tasks,
                                           mode=mode, chunk_size=chunk)
    assert torch.allclose(loss_1, loss_2, rtol=1e-13, atol=0)
    assert metrics_1.keys() == metrics_2.keys()
    assert all(torch.allclose(metrics_1[k], metrics_2[k], rtol=1e-13, atol=0) for k in metrics_1)
    assert tree_relative_error(two, single) < 1e-10
    if adapt == "3":  # only the top layer adapts: the reference agrees on that too
        module = torch_encoder()
        _, ref = reference_meta_gradient(module, params, tasks, ways=3, inner_lr=0.2, head_lr=0.5, steps=3,
                                         first_order=True, adapted=lambda k: k.startswith("3."))
        assert tree_relative_error(two, ref) < 1e-10


def test_query_chunk_size_is_checked():
    encoder, _ = functionalize(nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
    with pytest.raises(ValueError, match=r"fo_proto_maml: query_chunk_size=5 needs two_pass=True \(got two_pass=False\)"):
        fo_proto_maml(encoder, query_chunk_size=5)
    with pytest.raises(ValueError, match=r"fo_proto_maml: query_chunk_size must be >= 1 \(got 0\)"):
        fo_proto_maml(encoder, two_pass=True, query_chunk_size=0)
    with pytest.raises(TypeError, match=r"fo_proto_maml: query_chunk_size must be an int \(got float 2.0\)"):
        fo_proto_maml(encoder, two_pass=True, query_chunk_size=2.0)


def test_two_pass_composes_with_torch_func_grad(float64):
    encoder, params = functionalize(convert_norm_layers(torch_encoder()))
    tasks = few_shot_tasks()
    _, _, reference = meta_gradient(fo_proto_maml(encoder, steps=2), params, tasks)
    learner = fo_proto_maml(encoder, steps=2, two_pass=True)
    tree = torch.func.grad(lambda p: meta_batch(learner.meta_loss)(p, tasks)[0])(params)
    assert tree_relative_error(tree, reference) < 1e-10


def test_gradient_through_prototypes_equals_finite_differences(float64):
    """With the encoder frozen in the inner loop, fo-ProtoMAML's meta-gradient is the exact derivative of the query
    loss with the head at gamma(theta) + (adapted head - gamma) held fixed: check it by central differences."""
    module = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))
    encoder, params = functionalize(convert_norm_layers(module))
    task = few_shot_tasks(num_tasks=1, shots=2, queries=1).task_at(0)
    learner = fo_proto_maml(encoder, inner_lr=0.3, head_lr=0.5, steps=2, adapt=lambda name: False)
    adapted, _ = learner.adapt(params, task.support_x, task.support_y)
    z = functional_call(module, params, (task.support_x,))
    gamma = prototype_head(z, task.support_y, 3)
    delta_w = (adapted[HEAD_WEIGHT] - gamma[0]).detach()
    delta_b = (adapted[HEAD_BIAS] - gamma[1]).detach()

    def objective(theta: dict) -> float:
        zs = functional_call(module, theta, (task.support_x,))
        c = torch.stack([zs[task.support_y == k].mean(0) for k in range(3)])
        logits = functional_call(module, theta, (task.query_x,)) @ (2 * c + delta_w).T - (c ** 2).sum(1) + delta_b
        return F.cross_entropy(logits, task.query_y).item()

    p = leaves(params)
    loss, _ = learner.meta_loss(p, task)
    grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
    assert abs(loss.item() - objective(params)) < 1e-12
    eps, fd = 1e-6, {}
    for name, value in params.items():
        flat = torch.zeros(value.numel())
        for j in range(value.numel()):
            plus, minus = value.detach().clone(), value.detach().clone()
            plus.view(-1)[j] += eps
            minus.view(-1)[j] -= eps
            flat[j] = (objective({**params, name: plus}) - objective({**params, name: minus})) / (2 * eps)
        fd[name] = flat.view_as(value)
    assert tree_relative_error(grads, fd) < 1e-7
    two_pass = fo_proto_maml(encoder, inner_lr=0.3, head_lr=0.5, steps=2, adapt=lambda name: False, two_pass=True)
    p = leaves(params)
    loss_2, _ = two_pass.meta_loss(p, task)
    assert tree_relative_error(dict(zip(p, torch.autograd.grad(loss_2, list(p.values())))), fd) < 1e-7


def test_initialised_head_logits_are_negative_squared_distances_plus_constant(float64):
    z, y, q = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(4, 5)
    weight, bias = prototype_head(z, y, 3)
    centres = torch.stack([z[y == k].mean(0) for k in range(3)])
    logits = q @ weight.T + bias
    assert torch.allclose(logits - (q ** 2).sum(1, keepdim=True), -torch.cdist(q, centres) ** 2, atol=1e-12)


def test_first_support_loss_is_the_protonet_loss(float64):
    """The per-example constant does not change the softmax: step 0 of ProtoMAML is a ProtoNet on the support set."""
    encoder, params = functionalize(convert_norm_layers(torch_encoder()))
    task = few_shot_tasks(num_tasks=1).task_at(0)
    _, proto_losses = protonet(encoder).adapt(params, task.support_x, task.support_y)
    adapted, losses = proto_maml(encoder, steps=3).adapt(params, task.support_x, task.support_y)
    assert losses.shape == (3,)
    assert torch.allclose(losses[0], proto_losses[0], rtol=1e-12)
    assert losses[-1] < losses[0]
    assert set(adapted) == set(params) | {HEAD_WEIGHT, HEAD_BIAS}


def test_evaluate_matches_meta_loss_value_and_adapts(float64):
    encoder, params = functionalize(convert_norm_layers(torch_encoder()))
    tasks = few_shot_tasks()
    learner = fo_proto_maml(encoder, inner_lr=0.3, steps=2)
    loss, metrics = meta_batch(learner.evaluate)(params, tasks)
    train_loss, _ = meta_batch(learner.meta_loss)(params, tasks)
    assert not loss.requires_grad and torch.allclose(loss, train_loss, rtol=1e-12)
    longer, _ = meta_batch(lambda p, t: learner.evaluate(p, t, steps=5))(params, tasks)
    assert not torch.allclose(longer, loss)


def test_bad_input_is_refused_eagerly():
    encoder, params = functionalize(torch_encoder())
    tasks = few_shot_tasks()
    with pytest.raises(ValueError, match=r"proto_maml: the encoder has torch norm layers .*metafunc.convert_norm_layers"):
        meta_batch(proto_maml(encoder).meta_loss, mode="vmap")(params, tasks)
    meta_batch(proto_maml(encoder).meta_loss, mode="loop")(params, tasks)  # exact in a loop: allowed
    meta_batch(proto_maml(encoder).meta_loss)(params, tasks)               # and auto takes the loop
    exact, exact_params = functionalize(convert_norm_layers(torch_encoder()))
    missing = Task(tasks.support_x, tasks.support_y.clamp(max=1), *tasks[2:])
    with pytest.raises(ValueError, match=r"fo_proto_maml: the support set of task 0 has no example of class 2"):
        meta_batch(fo_proto_maml(exact, ways=3).meta_loss)(exact_params, missing)
    with pytest.raises(ValueError, match=r"fo_proto_maml: task 0 has query label 2 .*not one of its support "
                                         r"classes 0..1 \(ways=2\)"):  # the number of ways comes from the support set
        meta_batch(fo_proto_maml(exact).meta_loss)(exact_params, missing)
    with pytest.raises(ValueError, match=r"fo_proto_maml: the labels go up to 2 but ways=2"):
        meta_batch(fo_proto_maml(exact, ways=2, two_pass=True).meta_loss)(exact_params, tasks)
    with pytest.raises(ValueError, match=r"proto_maml: inner_lr must be > 0 \(got -0.1\)"):
        proto_maml(exact, inner_lr=-0.1)
    with pytest.raises(ValueError, match=r"proto_maml: head_lr must be >= 0 \(got -1\)"):
        proto_maml(exact, head_lr=-1)
    flat, flat_params = functionalize(nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (2, 2))))
    with pytest.raises(ValueError, match=r"proto_maml: the encoder must return features of shape"):
        meta_batch(proto_maml(flat).meta_loss)(flat_params, tasks)
    clash, clash_params = functionalize(nn.Sequential(nn.Linear(3, 4)))
    clash_params = {**clash_params, HEAD_WEIGHT: torch.zeros(3, 4)}
    with pytest.raises(ValueError, match=r"proto_maml: the encoder parameters must not use the names"):
        meta_batch(proto_maml(clash).meta_loss)(clash_params, tasks)


@pytest.mark.parametrize("query_chunk_size", [None, 2, 4], ids=["whole-query", "chunks-of-2", "chunks-of-4-uneven"])
@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_two_pass_equals_single_graph_with_the_transformer_in_the_loop(float64, mode, query_chunk_size):
    """Seed 000's setting on a tiny BERT (transformers' own): cached states below the top layer, the top transformer layer and the
    prototype head adapted in the inner loop; the two-pass meta-gradient (whole query set or in chunks) equals the
    single-graph one, and second-order ProtoMAML runs too."""
    transformers = pytest.importorskip("transformers")
    from metafunc.hf import TransformerEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=16)
    net = TransformerEncoder(transformers.BertModel(config).to(torch.float64))
    g = torch.Generator().manual_seed(0)

    def states(n):
        tokens = torch.stack([torch.randint(1, 40, (n, 6), generator=g), torch.ones(n, 6, dtype=torch.long)], dim=1)
        tokens[:, 1, 4:] = 0                                          # padding
        return net.lower_states(tokens, top=1)

    y = torch.tensor([0, 0, 1, 1, 2, 2])
    tasks = Task(torch.stack([states(6), states(6)]), torch.stack([y, y]), torch.stack([states(6), states(6)]),
                 torch.stack([y, y]))
    encoder, params = functionalize(net.top_layers(1))
    assert all(k.startswith("encoder.layer.1.") for k in params)
    kwargs = dict(inner_lr=0.1, head_lr=0.5, steps=2)
    loss_1, metrics_1, single = meta_gradient(fo_proto_maml(encoder, **kwargs), params, tasks, mode=mode)
    loss_2, metrics_2, two = meta_gradient(
        fo_proto_maml(encoder, two_pass=True, query_chunk_size=query_chunk_size, **kwargs), params, tasks, mode=mode)
    assert torch.allclose(loss_1, loss_2, rtol=1e-13, atol=0)
    assert all(torch.allclose(metrics_1[k], metrics_2[k], rtol=1e-13, atol=0) for k in metrics_1)
    assert sum(float(v.abs().sum()) for v in single.values()) > 0
    assert tree_relative_error(two, single) < 1e-10
    loss_2nd, _, second = meta_gradient(proto_maml(encoder, **kwargs), params, tasks, mode=mode)
    assert torch.isfinite(loss_2nd) and tree_relative_error(second, single) > 1e-6   # the Hessian term is there
