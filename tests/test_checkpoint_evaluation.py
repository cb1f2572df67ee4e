"""A checkpoint evaluated at another number of ways with a prototype-initialised output layer (BOIL's 20-way
protocol), against a reference written with torch.autograd on the nn.Module."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metafunc.train import TrainConfig, train
from metafunc.train.checkpoint import load_checkpoint
from metafunc.train.checkpoint_evaluation import _parameters, evaluate_checkpoint
from metafunc.train.config import resolve_config
from metafunc.train.experiment import build_experiment, build_network


def reference_prototype_head_loss(body: nn.Module, params, task, *, ways, inner_lr, head_lr, steps):
    """The prototype layer over the body's features, then ``steps`` SGD steps (body at ``inner_lr``, layer at
    ``head_lr``), then the query loss and accuracy; written on the module with torch.autograd.grad."""
    xs, ys, xq, yq = task
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    c = torch.stack([functional_call(body, theta, (xs,))[ys == k].mean(0) for k in range(ways)])
    w, b = (2 * c).detach().requires_grad_(True), (-(c ** 2).sum(1)).detach().requires_grad_(True)
    for _ in range(steps):
        support = F.cross_entropy(functional_call(body, theta, (xs,)) @ w.T + b, ys)
        grads = torch.autograd.grad(support, [*theta.values(), w, b])
        theta = {k: (v - inner_lr * g).detach().requires_grad_(True) for (k, v), g in zip(theta.items(), grads)}
        w, b = (w - head_lr * grads[-2]).detach(), (b - head_lr * grads[-1]).detach()
        w, b = w.requires_grad_(True), b.requires_grad_(True)
    logits = functional_call(body, theta, (xq,)) @ w.T + b
    return F.cross_entropy(logits, yq).item(), (logits.argmax(-1) == yq).double().mean().item()


@pytest.mark.parametrize("algorithm,head_lr", [("boil", 0.0), ("maml", 0.4), ("anil", 0.4)])
def test_prototype_head_equals_the_autograd_reference(algorithm, head_lr, tmp_path):
    run = train(TrainConfig(dataset="synthetic", algorithm=algorithm, iterations=3, width=8, inner_lr=0.4,
                            out=str(tmp_path / algorithm)), progress=False)
    ckpt = load_checkpoint(run.out / "checkpoint.pt")
    cfg = resolve_config(TrainConfig(**{**ckpt["config"], "ways": 7}))
    exp, body_params, _ = _parameters(ckpt, build_experiment(cfg), cfg, 5, "prototypes")
    assert not any(k.startswith("head.") for k in body_params)
    task = exp.sources["val"].sample(1, torch.Generator().manual_seed(3)).task_at(0)
    loss, metrics = exp.learner.evaluate(body_params, task, steps=2)
    module = build_network(cfg, exp.sources["val"].sample(1, torch.Generator()), with_head=True)
    module.head = nn.Identity()   # the features the output layer takes
    frozen_body = algorithm == "anil"
    ref_loss, ref_accuracy = reference_prototype_head_loss(
        module, body_params, task, ways=7, inner_lr=0.0 if frozen_body else 0.4, head_lr=head_lr, steps=2)
    assert abs(loss.item() - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert abs(metrics["accuracy"].item() - ref_accuracy) < 1e-6


def test_new_head_is_checked():
    with pytest.raises(ValueError, match=r"evaluate_checkpoint: new_head must be one of zero, prototypes \(got 'ones'\)"):
        evaluate_checkpoint("missing.pt", new_head="ones")


def test_sgd_inner_loop_is_plain_gradient_descent_from_the_meta_parameters(tmp_path):
    """iMAML's test protocol (lambda = 0): the checkpoint adapts by plain SGD on every parameter, as a
    torch.autograd loop on the nn.Module does, not by iMAML's proximal inner loop."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from reference import reference_task_objective

    from metafunc.train.checkpoint_evaluation import _sgd_inner_loop

    run = train(TrainConfig(dataset="synthetic", algorithm="imaml", iterations=3, width=8, inner_lr=0.4,
                            eval_inner_steps=2, out=str(tmp_path / "imaml")), progress=False)
    ckpt = load_checkpoint(run.out / "checkpoint.pt")
    cfg = resolve_config(TrainConfig(**ckpt["config"]))
    exp, params, _ = _parameters(ckpt, build_experiment(cfg), cfg, 5, "zero")
    sgd, note = _sgd_inner_loop(exp, cfg, params, None)
    assert note.startswith("inner loop: plain gradient descent on every parameter (lr 0.4) instead of imaml's own")
    task = exp.sources["val"].sample(1, torch.Generator().manual_seed(3)).task_at(0)
    loss, _ = sgd.learner.evaluate(params, task, steps=2)
    own_loss, _ = exp.learner.evaluate(params, task, steps=2)
    module = build_network(cfg, exp.sources["val"].sample(1, torch.Generator()), with_head=True)
    reference = reference_task_objective(module, {k: v.clone().requires_grad_(True) for k, v in params.items()},
                                         list(task), algorithm="maml", inner_lr=0.4, steps=2)
    assert abs(loss.item() - reference.item()) < 1e-5 * max(1.0, abs(reference.item()))
    assert abs(own_loss.item() - reference.item()) > 1e-4   # iMAML's proximal loop is another adaptation
    with pytest.raises(ValueError, match=r"evaluate_checkpoint: inner_loop must be one of learner, sgd \(got 'adam'\)"):
        evaluate_checkpoint(run.out / "checkpoint.pt", inner_loop="adam")
    meta_sgd = train(TrainConfig(dataset="synthetic", algorithm="meta_sgd", iterations=1, width=8,
                                 out=str(tmp_path / "meta_sgd")), progress=False)
    with pytest.raises(ValueError, match=r"inner_loop='sgd' .* but meta_sgd cannot be evaluated that way: its "
                                         r"parameters \['inner_lr/"):
        evaluate_checkpoint(meta_sgd.out / "checkpoint.pt", episodes=2, inner_loop="sgd")
