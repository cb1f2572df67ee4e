"""``compiled_meta_step``: the whole meta-step traced and compiled, checked against a float64 autograd reference, and
its own check against eager catching a compiler that changes the numbers."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from test_fast_paths import LR, _conv4, _reference, _tasks
from torch import Tensor

from metafunc import LayerNorm, Task, compiled_meta_step, functionalize, maml, meta_value_and_grad, protonet
from metafunc.core.tree import tree_relative_error

f64 = torch.float64


def _perturbing_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    def run(*args):
        return [o * 1.01 if isinstance(o, Tensor) and o.is_floating_point() else o for o in gm(*args)]
    return run


torch._dynamo.register_backend(name="metafunc_test_off_by_one_percent", compiler_fn=_perturbing_backend)


def test_aot_traced_conv4_batchnorm_meta_step_is_the_float64_reference():
    model, params = functionalize(_conv4())
    tasks = _tasks(2)
    learner = maml(model, inner_lr=LR, steps=2)
    step = compiled_meta_step(learner.meta_loss, backend="aot_eager")
    loss, metrics, grads = step(params, tasks)
    assert tree_relative_error(grads, _reference(params, tasks, steps=2, first_order=False)) < 1e-10
    eager_loss, eager_metrics, _ = meta_value_and_grad(learner.meta_loss)(params, tasks)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["accuracy"], eager_metrics["accuracy"])
    more = _tasks(3, seed=4)  # a new input signature is traced again, and checked again
    assert tree_relative_error(step(params, more)[2], _reference(params, more, steps=2, first_order=False)) < 1e-10


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor generates C++ on a CPU and needs a C++ compiler")
def test_inductor_compiled_meta_step_on_an_mlp_with_layer_norm_is_the_float64_reference():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 16), LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model, params = functionalize(module.to(f64))
    g = torch.Generator().manual_seed(3)
    tasks = Task(torch.randn(2, 6, 4, generator=g, dtype=f64), torch.arange(3).repeat(2, 2),
                 torch.randn(2, 9, 4, generator=g, dtype=f64), torch.arange(3).repeat(2, 3))
    learner = maml(model, inner_lr=LR, steps=1)
    grads = compiled_meta_step(learner.meta_loss)(params, tasks)[2]

    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    total = 0.0
    for i in range(2):
        sx, sy, qx, qy = (t[i] for t in tasks)
        support = F.cross_entropy(torch.func.functional_call(module, leaves, (sx,)), sy)
        inner = torch.autograd.grad(support, list(leaves.values()), create_graph=True)
        fast = {k: v - LR * g_ for (k, v), g_ in zip(leaves.items(), inner)}
        total = total + F.cross_entropy(torch.func.functional_call(module, fast, (qx,)), qy) / 2
    reference = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))
    assert tree_relative_error(grads, reference) < 1e-9


def test_protonet_meta_step_compiles_in_loop_mode_and_matches_eager():
    torch.manual_seed(0)
    encoder, params = functionalize(torch.nn.Sequential(_conv4().features, torch.nn.Flatten()))
    tasks = _tasks(2)
    learner = protonet(encoder)
    got = compiled_meta_step(learner.meta_loss, mode="loop", backend="aot_eager")(params, tasks)[2]
    expected = meta_value_and_grad(learner.meta_loss)(params, tasks)[2]
    assert tree_relative_error(got, expected) < 1e-10


def test_a_compiler_that_changes_the_meta_gradient_is_caught_on_the_first_call():
    model, params = functionalize(_conv4())
    learner = maml(model, inner_lr=LR, steps=1)
    step = compiled_meta_step(learner.meta_loss, backend="metafunc_test_off_by_one_percent")
    with pytest.raises(RuntimeError, match=r"^compiled_meta_step: the compiled meta-gradient differs from the eager "
                                           r"one by 1\.00e-02 \(relative, whole tree\) > rtol=1e-09"):
        step(params, _tasks(2))
    unchecked = compiled_meta_step(learner.meta_loss, backend="metafunc_test_off_by_one_percent", check=False)
    grads = unchecked(params, _tasks(2))[2]
    exact = meta_value_and_grad(learner.meta_loss)(params, _tasks(2))[2]
    assert tree_relative_error(grads, exact) == pytest.approx(0.01, rel=1e-6)


def test_bad_arguments_are_refused_before_anything_is_traced():
    model, params = functionalize(_conv4())
    learner = maml(model, inner_lr=LR)
    with pytest.raises(TypeError, match=r"^compiled_meta_step: per_task must be a MetaLearner or callable as per_task\(params, task\) \(got int\)"):
        compiled_meta_step(3)
    with pytest.raises(ValueError, match=r"^compiled_meta_step: mode must be one of 'vmap', 'loop' \(got 'auto'\)"):
        compiled_meta_step(learner.meta_loss, mode="auto")
    with pytest.raises(ValueError, match=r"^compiled_meta_step: unknown backend 'tensorrt-ish'; choose one of"):
        compiled_meta_step(learner.meta_loss, backend="tensorrt-ish")
    with pytest.raises(ValueError, match=r"^compiled_meta_step: rtol must be a number > 0 \(got -1\)"):
        compiled_meta_step(learner.meta_loss, rtol=-1)
    with pytest.raises(ValueError, match=r"^compiled_meta_step: cuda_graphs=True needs backend='inductor' "
                                         r"\(got 'aot_eager'\)"):
        compiled_meta_step(learner.meta_loss, backend="aot_eager", cuda_graphs=True)
    with pytest.raises(ValueError, match=r"^compiled_meta_step: cuda_graphs=True needs CUDA tensors \(got tasks on "
                                         r"cpu\); move params and tasks with \.to\('cuda'\)"):
        compiled_meta_step(learner.meta_loss, cuda_graphs=True)(params, _tasks(2))
    frozen = {k: v.detach() for k, v in params.items()}
    with pytest.raises(ValueError, match=r"^compiled_meta_step: no parameter requires grad"):
        compiled_meta_step(learner.meta_loss, backend="eager")(frozen, _tasks(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the lent GPU)")
def test_cuda_graph_replay_matches_eager_on_the_gpu_and_its_results_stay_valid():
    model, params = functionalize(_conv4().to("cuda"))
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    tasks, other = _tasks(4).to("cuda"), _tasks(4, seed=7).to("cuda")
    learner = maml(model, inner_lr=LR, steps=1)
    step = compiled_meta_step(learner.meta_loss, cuda_graphs=True)
    results = [step(params, tasks if i % 2 == 0 else other)[2] for i in range(5)]  # warm-up, record, replays
    eager = meta_value_and_grad(learner.meta_loss)
    expected, expected_other = eager(params, tasks)[2], eager(params, other)[2]
    for i, grads in enumerate(results):  # earlier results were not overwritten by later replays
        assert tree_relative_error(grads, expected if i % 2 == 0 else expected_other) < 1e-9
