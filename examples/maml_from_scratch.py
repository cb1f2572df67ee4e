"""MAML written out by hand, checked against metafunc.

A family of random binary classification tasks: task t has a true direction ``w_t = mu + sigma * eps_t`` shared
around a common ``mu``; its inputs are ``x ~ N(0, I)`` and its labels ``y = [x . w_t + b_t > 0]``. The model is a
single-layer logistic regression ``p(y=1|x) = sigmoid(x . w + b)``.

MAML (Finn et al., 2017), step by step, with nothing but ``torch.autograd``:

1. sample a meta-batch of tasks, each with K support and some query points;
2. inner step: ``phi_t = theta - alpha * grad_theta CE(theta; support_t)`` (kept in the graph: ``create_graph``);
3. outer loss: ``CE(phi_t; query_t)`` on fresh points, averaged over the tasks;
4. meta-gradient: its gradient with respect to ``theta`` (through the inner step: second order);
5. update ``theta <- theta - beta * meta_gradient``.

First-order MAML drops the second-order term (the inner gradient is treated as a constant). The script checks both
meta-gradients against ``metafunc.maml`` / ``metafunc.fomaml`` on the same tasks (relative error in float64), then
trains both and compares post-adaptation accuracy with a random initialisation and with plain joint training.

Run: ``python examples/maml_from_scratch.py --steps 800`` (about 30 s of CPU time)
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import Tensor

import metafunc
from metafunc.core.tree import tree_relative_error

__all__ = ["main"]

Theta = dict[str, Tensor]


# ---- the task family ------------------------------------------------------------------------------------------------

def sample_tasks(n: int, *, shots: int, queries: int, mu: Tensor, sigma: float,
                 generator: torch.Generator) -> metafunc.Task:
    """``n`` tasks as a stacked ``metafunc.Task``; labels are floats in {0, 1}."""
    dim = mu.numel()
    w = mu + sigma * torch.randn(n, dim, generator=generator)
    b = 0.5 * torch.randn(n, 1, generator=generator)
    x = torch.randn(n, shots + queries, dim, generator=generator)
    y = ((x @ w.unsqueeze(-1)).squeeze(-1) + b > 0).to(x.dtype)
    return metafunc.Task(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


# ---- MAML by hand ---------------------------------------------------------------------------------------------------
# theta = {"weight": (1, dim), "bias": (1,)}, the layout of nn.Linear(dim, 1). For speed the tasks of a meta-batch are
# handled together: theta is expanded to one copy per task and differentiated with respect to those copies, which
# gives every task its own inner gradient in one autograd call (plain torch.autograd, no vmap, no metafunc).

def logits(theta: Theta, x: Tensor) -> Tensor:
    """x: (tasks, points, dim); theta leaves: (1, dim)/(1,) shared or (tasks, 1, dim)/(tasks, 1) per task."""
    w, b = theta["weight"], theta["bias"]
    if w.dim() == 2:
        return (x @ w.T).squeeze(-1) + b
    return (x @ w.transpose(1, 2)).squeeze(-1) + b


def cross_entropy(theta: Theta, x: Tensor, y: Tensor) -> Tensor:
    """Sum over tasks of each task's mean binary cross-entropy."""
    return F.binary_cross_entropy_with_logits(logits(theta, x), y, reduction="none").mean(-1).sum()


def per_task(theta: Theta, tasks: int) -> Theta:
    return {"weight": theta["weight"].expand(tasks, *theta["weight"].shape),
            "bias": theta["bias"].expand(tasks, *theta["bias"].shape)}


def inner_step(theta: Theta, x: Tensor, y: Tensor, alpha: float, *, second_order: bool) -> Theta:
    """phi_t = theta_t - alpha * grad CE(theta_t; support_t) for every task t at once (theta_t: per-task copies)."""
    grads = torch.autograd.grad(cross_entropy(theta, x, y), list(theta.values()), create_graph=second_order)
    return {k: w - alpha * g for (k, w), g in zip(theta.items(), grads)}


def meta_gradient(theta: Theta, tasks: metafunc.Task, alpha: float, *, second_order: bool) -> tuple[Tensor, Theta]:
    """Mean query loss after one inner step, and its gradient with respect to theta."""
    copies = per_task(theta, tasks.num_tasks)
    phi = inner_step(copies, tasks.support_x, tasks.support_y, alpha, second_order=second_order)
    outer = cross_entropy(phi, tasks.query_x, tasks.query_y) / tasks.num_tasks
    grads = torch.autograd.grad(outer, list(theta.values()))
    return outer.detach(), dict(zip(theta, grads))


# ---- the same with metafunc -----------------------------------------------------------------------------------------

def metafunc_meta_gradient(theta: Theta, tasks: metafunc.Task, alpha: float, *, second_order: bool) -> Theta:
    model, _ = metafunc.functionalize(torch.nn.Linear(theta["weight"].shape[1], 1))
    loss = lambda prediction, y: F.binary_cross_entropy_with_logits(prediction.squeeze(-1), y)  # noqa: E731
    factory = metafunc.maml if second_order else metafunc.fomaml
    learner = factory(model, inner_lr=alpha, steps=1, loss=loss)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    outer, _ = metafunc.meta_batch(learner.meta_loss)(params, tasks)
    return dict(zip(params, torch.autograd.grad(outer, list(params.values()))))


# ---- training and evaluation ----------------------------------------------------------------------------------------

def init_theta(dim: int, generator: torch.Generator) -> Theta:
    bound = 1 / math.sqrt(dim)  # nn.Linear's initialisation
    return {"weight": ((torch.rand(1, dim, generator=generator) * 2 - 1) * bound).requires_grad_(True),
            "bias": ((torch.rand(1, generator=generator) * 2 - 1) * bound).requires_grad_(True)}


def train_maml(theta: Theta, args: argparse.Namespace, mu: Tensor, *, second_order: bool, seed: int) -> Theta:
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(args.steps):
        tasks = sample_tasks(args.meta_batch, shots=args.shots, queries=args.queries, mu=mu, sigma=args.sigma,
                             generator=gen)
        _, grads = meta_gradient(theta, tasks, args.alpha, second_order=second_order)
        with torch.no_grad():
            for k in theta:
                theta[k] -= args.beta * grads[k]
    return theta


def train_joint(theta: Theta, args: argparse.Namespace, mu: Tensor, *, seed: int) -> Theta:
    """Plain joint training: one classifier fit to the pooled points of all tasks (same steps, same step size)."""
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(args.steps):
        t = sample_tasks(args.meta_batch, shots=args.shots, queries=args.queries, mu=mu, sigma=args.sigma,
                         generator=gen)
        x = torch.cat([t.support_x, t.query_x], 1).reshape(1, -1, mu.numel())
        y = torch.cat([t.support_y, t.query_y], 1).reshape(1, -1)
        grads = torch.autograd.grad(cross_entropy(theta, x, y), list(theta.values()))
        with torch.no_grad():
            for (k, w), g in zip(theta.items(), grads):
                w -= args.beta * g
    return theta


def accuracy(theta: Theta, tasks: metafunc.Task, alpha: float, adapt_steps: int) -> float:
    """Mean query accuracy after ``adapt_steps`` SGD steps on each task's support set."""
    phi = {k: v.detach() for k, v in per_task(theta, tasks.num_tasks).items()}
    for _ in range(adapt_steps):
        phi = {k: v.requires_grad_(True) for k, v in phi.items()}
        phi = {k: v.detach() for k, v in inner_step(phi, tasks.support_x, tasks.support_y, alpha,
                                                    second_order=False).items()}
    with torch.no_grad():
        return float(((logits(phi, tasks.query_x) > 0).to(tasks.query_y.dtype) == tasks.query_y).float().mean())


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the walk-through; returns the gradient checks and the accuracy table as a dict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="outer (meta) steps")
    parser.add_argument("--dim", type=int, default=10, help="input dimension")
    parser.add_argument("--shots", type=int, default=10, help="support points per task (K)")
    parser.add_argument("--queries", type=int, default=20, help="query points per task during meta-training")
    parser.add_argument("--meta-batch", type=int, default=16, help="tasks per meta-step")
    parser.add_argument("--alpha", type=float, default=5.0, help="inner learning rate")
    parser.add_argument("--beta", type=float, default=0.5, help="outer learning rate (plain SGD)")
    parser.add_argument("--sigma", type=float, default=1.5, help="spread of the task directions around mu")
    parser.add_argument("--mu-norm", type=float, default=3.0, help="length of the shared direction mu")
    parser.add_argument("--eval-tasks", type=int, default=300, help="held-out tasks for the accuracy table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)  # the gradient check is exact in float64
    gen = torch.Generator().manual_seed(args.seed)
    mu = torch.randn(args.dim, generator=gen)
    mu = args.mu_norm * mu / mu.norm()
    theta0 = init_theta(args.dim, gen)

    # 1. the hand-written meta-gradient equals metafunc's on the same tasks
    check_tasks = sample_tasks(4, shots=args.shots, queries=args.queries, mu=mu, sigma=args.sigma, generator=gen)
    _, mine = meta_gradient(theta0, check_tasks, args.alpha, second_order=True)
    _, mine_fo = meta_gradient(theta0, check_tasks, args.alpha, second_order=False)
    err = tree_relative_error(mine, metafunc_meta_gradient(theta0, check_tasks, args.alpha, second_order=True))
    err_fo = tree_relative_error(mine_fo, metafunc_meta_gradient(theta0, check_tasks, args.alpha, second_order=False))
    gap = tree_relative_error(mine_fo, mine)
    print(f"meta-gradient check, hand-written MAML vs metafunc.maml: relative error {err:.3e}")
    print(f"meta-gradient check, hand-written first-order MAML vs metafunc.fomaml: relative error {err_fo:.3e}")
    print(f"first-order vs second-order meta-gradient: relative difference {gap:.3f} (the Hessian term)")

    # 2. train, then adapt on held-out tasks
    thetas = {
        "random init": theta0,
        "joint training": train_joint(theta0, args, mu, seed=args.seed + 1),
        "first-order MAML": train_maml(theta0, args, mu, second_order=False, seed=args.seed + 1),
        "second-order MAML": train_maml(theta0, args, mu, second_order=True, seed=args.seed + 1),
    }
    test = sample_tasks(args.eval_tasks, shots=args.shots, queries=100, mu=mu, sigma=args.sigma,
                        generator=torch.Generator().manual_seed(args.seed + 99))
    print(f"\npost-adaptation accuracy on {args.eval_tasks} held-out tasks ({args.shots} support points, 100 query "
          f"points, inner lr {args.alpha}); {args.steps} outer steps")
    print(f"{'initialisation':<20}{'0 steps':>10}{'1 step':>10}{'5 steps':>10}")
    result = {"meta_gradient_error": err, "first_order_error": err_fo, "first_vs_second_order": gap}
    for name, theta in thetas.items():
        row = [accuracy(theta, test, args.alpha, s) for s in (0, 1, 5)]
        print(f"{name:<20}" + "".join(f"{a:>10.3f}" for a in row))
        result.update({f"{name} / {s}": a for s, a in zip((0, 1, 5), row)})
    return result


if __name__ == "__main__":
    main()
