"""metafunc.distributed: sharded meta-steps across 2 CPU processes (gloo) equal one process on the whole meta-batch,
and a rank that dies or hangs stops the others with a clear error within the timeout.

Multi-process tests launch this file as a worker (``python tests/test_distributed.py WORKER ARGS``) with the
environment ``torchrun`` would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import metafunc
from metafunc import Task, functionalize, meta_batch, models, sinusoid_tasks
from metafunc import distributed as D
from metafunc.tree import tree_relative_error

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
META_BATCH = 5          # uneven over 2 ranks: 3 + 2
SHOTS = 4
SEED = 7
INNER_LR = 0.05
WAYS = 3


# ----------------------------------------------------------------------------------------------------------------
# shared setup of the workers and of the single-process references
# ----------------------------------------------------------------------------------------------------------------

def _draw(num_tasks: int, generator: torch.Generator) -> Task:
    return sinusoid_tasks(num_tasks, shots=SHOTS, generator=generator, dtype=torch.get_default_dtype())


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return functionalize(models.mlp(1, (8,), 1, norm="layer"))   # metafunc's exact LayerNorm


def _learner(name: str, model):
    if name == "maml":
        return metafunc.maml(model, inner_lr=INNER_LR, steps=2, loss="mse")
    if name == "protonet":
        return metafunc.protonet(model, ways=WAYS)
    raise ValueError(name)


def _draw_classes(num_tasks: int, generator: torch.Generator) -> Task:
    """WAYS-way classification of Gaussian clusters in 4-D, 2 shots and 2 queries per class, for ProtoNets."""
    dtype = torch.get_default_dtype()
    means = 2 * torch.randn(num_tasks, WAYS, 1, 4, generator=generator, dtype=dtype)
    x = means + torch.randn(num_tasks, WAYS, 4, 4, generator=generator, dtype=dtype)
    y = torch.arange(WAYS).reshape(1, WAYS, 1).expand(num_tasks, WAYS, 4)
    return Task(x[:, :, :2].reshape(num_tasks, -1, 4), y[:, :, :2].reshape(num_tasks, -1),
                x[:, :, 2:].reshape(num_tasks, -1, 4), y[:, :, 2:].reshape(num_tasks, -1))


def _setup(name: str):
    """(params, learner, sampler) of a tiny model with metafunc's exact LayerNorm."""
    torch.manual_seed(0)
    if name == "maml":
        model, params = functionalize(models.mlp(1, (8,), 1, norm="layer"))
        return params, _learner(name, model), _draw
    model, params = functionalize(models.mlp(4, (8,), 6, norm="layer"))   # a 6-D embedding
    return params, _learner(name, model), _draw_classes


def _train(name: str, steps: int, *, rank: int = 0, world_size: int = 1, mode: str = "vmap",
           state: dict | None = None, on_step=None) -> dict:
    """``steps`` Adam meta-steps as the CLI takes them: each rank draws its share of the meta-batch with a
    ShardedSource and distributed_meta_gradient all-reduces the gradient. ``state`` resumes from a checkpoint."""
    params, learner, draw = _setup(name)
    opt = torch.optim.Adam(params.values(), lr=0.01)
    generator = torch.Generator().manual_seed(SEED)
    start = 0
    if state is not None:
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(state["params"][k])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start = state["step"]
    source = D.ShardedSource(draw, rank=rank, world_size=world_size)
    step_fn = meta_batch(learner.meta_loss, mode=mode)
    for t in range(start, steps):
        tasks = source.sample(META_BATCH, generator)
        opt.zero_grad()
        D.distributed_meta_gradient(step_fn, params, tasks)
        opt.step()
        if on_step is not None:
            on_step(t + 1, params, opt, generator)
    return {k: v.detach().clone() for k, v in params.items()}


def _reference_meta_grad(params: dict, tasks: Task, inner_steps: int = 2) -> dict:
    """MAML's meta-gradient by a plain loop over tasks with torch.autograd.grad(create_graph=True)."""
    model, _ = _model()
    names = list(params)
    losses = []
    for i in range(tasks.num_tasks):
        task = tasks.task_at(i)
        fast = dict(params)
        for _ in range(inner_steps):
            inner = torch.nn.functional.mse_loss(model(fast, task.support_x), task.support_y)
            grads = torch.autograd.grad(inner, [fast[k] for k in names], create_graph=True)
            fast = {k: fast[k] - INNER_LR * g for k, g in zip(names, grads)}
        losses.append(torch.nn.functional.mse_loss(model(fast, task.query_x), task.query_y))
    outer = torch.stack(losses).mean()
    return dict(zip(names, torch.autograd.grad(outer, [params[k] for k in names])))


# ----------------------------------------------------------------------------------------------------------------
# workers (run in child processes)
# ----------------------------------------------------------------------------------------------------------------

def worker_equivalence(out: str) -> None:
    torch.set_default_dtype(torch.float64)
    info = D.init_distributed(timeout=60)
    assert info.backend == "gloo" and info.world_size == 2, info
    result: dict = {"rank": info.rank}
    tasks = D.sample_shard(_draw, META_BATCH, seed=SEED, step=0, rank=info.rank, world_size=info.world_size)
    result["num_tasks"] = tasks.num_tasks
    model, params = _model()
    learner = _learner("maml", model)
    for mode in ("vmap", "loop"):
        # path 1: meta_batch(...) then backward, then the weighted all-reduce of .grad
        for p in params.values():
            p.grad = None
        loss, metrics = meta_batch(learner.meta_loss, mode=mode)(params, tasks)
        loss.backward()
        loss, metrics = D.all_reduce_meta_grads(params, tasks.num_tasks, loss, metrics)
        result[f"backward_{mode}"] = {k: v.grad.clone() for k, v in params.items()}
        result[f"loss_{mode}"] = loss
        # path 2: the sharded meta-gradient transform
        grads, loss2, _ = D.sharded_meta_grad(meta_batch(learner.meta_loss, mode=mode))(params, tasks)
        result[f"sharded_{mode}"] = grads
    # path 3: a function that returns gradients itself (first-order MAML's gradient, computed per shard)
    fo = metafunc.fomaml(model, inner_lr=INNER_LR, steps=2, loss="mse")

    def fo_grads(p, t):
        loss, metrics = meta_batch(fo.meta_loss)(p, t)
        return dict(zip(p, torch.autograd.grad(loss, list(p.values())))), metrics

    result["grads_fn"] = D.sharded_meta_grad(fo_grads, returns="grads")(params, tasks)[0]
    result["train_maml"] = _train("maml", 3, rank=info.rank, world_size=info.world_size, mode="vmap")
    result["train_protonet"] = _train("protonet", 3, rank=info.rank, world_size=info.world_size, mode="loop")
    torch.save(result, Path(out) / f"rank{info.rank}.pt")
    D.shutdown_distributed()


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def worker_train(out: str, steps: str, timeout: str, resume: str) -> None:
    """A training run that checkpoints every step on rank 0 (the CLI's job, reduced to what the fault test needs)."""
    torch.set_default_dtype(torch.float64)
    info = D.init_distributed(timeout=float(timeout))
    ckpt = Path(out) / "checkpoint.pt"
    state = None
    if resume == "1":
        state = D.broadcast_object(torch.load(ckpt, weights_only=True) if info.is_main else None)

    def on_step(step, params, opt, generator):
        if info.is_main:
            _atomic_save({"step": step, "params": {k: v.detach() for k, v in params.items()},
                          "optimizer": opt.state_dict(), "generator": generator.get_state()}, ckpt)
        time.sleep(0.15)   # slow enough for the test to act mid-training

    try:
        _train("maml", int(steps), rank=info.rank, world_size=info.world_size, state=state, on_step=on_step)
    except D.DistributedError as e:
        print(f"error at {time.time():.3f}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"rank {info.rank}: done", flush=True)
    D.shutdown_distributed()


# ----------------------------------------------------------------------------------------------------------------
# launching
# ----------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world_size: int, *args: str) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": "1"}
        if world_size == 1:
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
                env.pop(k)
        procs.append(subprocess.Popen([sys.executable, str(HERE), *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, out + err))
    return results


# ----------------------------------------------------------------------------------------------------------------
# tests without processes
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("meta_batch_size, world_size, expected", [(4, 2, [2, 2]), (5, 2, [3, 2]), (7, 3, [3, 2, 2]),
                                                                   (1, 1, [1])])
def test_shard_sizes_tile_the_meta_batch(meta_batch_size, world_size, expected):
    assert D.shard_sizes(meta_batch_size, world_size) == expected
    ranges = [D.shard_range(meta_batch_size, r, world_size) for r in range(world_size)]
    assert [i for r in ranges for i in r] == list(range(meta_batch_size))


def test_shards_of_a_drawn_batch_concatenate_to_it():
    tasks = sinusoid_tasks(5, shots=3, generator=torch.Generator().manual_seed(0))
    parts = [D.shard_tasks(tasks, r, 2) for r in range(2)]
    assert [p.num_tasks for p in parts] == [3, 2]
    for field in range(4):
        assert torch.equal(torch.cat([p[field] for p in parts]), tasks[field])


def test_sample_shard_is_reproducible_distinct_and_independent_of_world_size():
    whole = D.sample_shard(_draw, 6, seed=3, step=2)
    for world_size in (2, 3):
        shards = [D.sample_shard(_draw, 6, seed=3, step=2, rank=r, world_size=world_size) for r in range(world_size)]
        for field in range(4):
            assert torch.equal(torch.cat([s[field] for s in shards]), whole[field])
    again = D.sample_shard(_draw, 6, seed=3, step=2)
    assert torch.equal(again.support_x, whole.support_x)
    other_step = D.sample_shard(_draw, 6, seed=3, step=3)
    other_seed = D.sample_shard(_draw, 6, seed=4, step=2)
    assert not torch.equal(other_step.support_x, whole.support_x)
    assert not torch.equal(other_seed.support_x, whole.support_x)
    # the tasks of one step are all different from one another
    assert len({tuple(x.flatten().tolist()) for x in whole.support_x}) == 6


def test_sample_shard_accepts_an_object_with_sample():
    class Sampler:
        def sample(self, n, generator):
            return _draw(n, generator)

    assert torch.equal(D.sample_shard(Sampler(), 3, seed=0, step=0).query_y,
                       D.sample_shard(_draw, 3, seed=0, step=0).query_y)


def test_sharded_source_draws_only_this_ranks_share_and_advances_every_generator_alike():
    gens = [torch.Generator().manual_seed(5) for _ in range(3)]
    shards = [D.ShardedSource(_draw, rank=r, world_size=2).sample(5, g) for r, g in zip(range(2), gens)]
    whole = D.ShardedSource(_draw).sample(5, gens[2])
    assert [s.num_tasks for s in shards] == [3, 2]
    for field in range(4):
        assert torch.equal(torch.cat([s[field] for s in shards]), whole[field])
    assert gens[0].get_state().equal(gens[1].get_state()) and gens[0].get_state().equal(gens[2].get_state())
    again = D.ShardedSource(_draw).sample(5, torch.Generator().manual_seed(5))
    assert torch.equal(again.query_x, whole.query_x)
    with pytest.raises(TypeError, match="ShardedSource: source must have .sample"):
        D.ShardedSource(3)
    with pytest.raises(ValueError, match=r"ShardedSource: rank must be in \[0, 2\)"):
        D.ShardedSource(_draw, rank=2, world_size=2)


def test_single_process_all_reduce_is_the_identity(float64):
    model, params = _model()
    learner = _learner("maml", model)
    tasks = D.sample_shard(_draw, 3, seed=0, step=0)
    loss, metrics = meta_batch(learner.meta_loss)(params, tasks)
    loss.backward()
    before = {k: v.grad.clone() for k, v in params.items()}
    new_loss, new_metrics = D.all_reduce_meta_grads(params, 3, loss, metrics)
    assert tree_relative_error({k: v.grad for k, v in params.items()}, before) == 0.0
    assert torch.equal(new_loss, loss.detach()) and set(new_metrics) == set(metrics)
    reference = _reference_meta_grad(params, tasks)
    grads, _, _ = D.sharded_meta_grad(meta_batch(learner.meta_loss))(params, tasks)
    assert tree_relative_error(grads, reference) < 1e-10
    for p in params.values():
        p.grad = None
    loss, _ = D.distributed_meta_gradient(meta_batch(learner.meta_loss, mode="loop"), params, tasks)
    assert tree_relative_error({k: v.grad for k, v in params.items()}, reference) < 1e-10


@pytest.mark.parametrize("call, message", [
    (lambda: D.shard_sizes(1, 2), "shard_sizes: meta_batch=1 is smaller than world_size=2"),
    (lambda: D.shard_sizes(4, 0), "shard_sizes: world_size must be >= 1 (got 0)"),
    (lambda: D.shard_range(4, 2, 2), "shard_range: rank must be in [0, 2) for world_size=2 (got 2)"),
    (lambda: D.task_seed(-1, 0, 0), "task_seed: seed must be an int >= 0 (got -1)"),
    (lambda: D.sample_shard(42, 2, seed=0, step=0), "sample_shard: sampler must be callable"),
    (lambda: D.init_distributed(timeout=0), "init_distributed: timeout must be > 0 seconds (got 0)"),
    (lambda: D.init_distributed(backend="mpi"), "init_distributed: backend must be one of"),
    (lambda: D.all_reduce_meta_grads({"w": torch.ones(1)}, 0), "all_reduce_meta_grads: num_tasks must be >= 1"),
    (lambda: D.all_reduce_meta_grads([torch.ones(1)], 1), "all_reduce_meta_grads: params must be a non-empty dict"),
    (lambda: D.sharded_meta_grad(len, returns="hessian"), "sharded_meta_grad: returns must be one of"),
])
def test_bad_input_is_refused_with_the_function_and_the_value(call, message):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert message in str(info.value)


def test_init_distributed_without_a_launcher_is_a_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = D.init_distributed(timeout=5)
    assert (info.rank, info.world_size, info.backend, info.is_main, info.distributed) == (0, 1, None, True, False)
    assert D.is_main_process() and D.broadcast_object({"a": 1}) == {"a": 1}
    D.barrier()
    D.shutdown_distributed()


# ----------------------------------------------------------------------------------------------------------------
# 2 processes with gloo
# ----------------------------------------------------------------------------------------------------------------

def test_two_ranks_equal_one_process_on_the_whole_meta_batch(tmp_path, float64):
    procs = _launch(2, "worker_equivalence", str(tmp_path))
    for rc, log in _finish(procs):
        assert rc == 0, log
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["num_tasks"] for r in ranks] == [3, 2]       # an uneven split

    whole = D.sample_shard(_draw, META_BATCH, seed=SEED, step=0)
    model, params = _model()
    reference = _reference_meta_grad(params, whole)
    fo = metafunc.fomaml(model, inner_lr=INNER_LR, steps=2, loss="mse")
    fo_loss, _ = meta_batch(fo.meta_loss)(params, whole)
    fo_reference = dict(zip(params, torch.autograd.grad(fo_loss, list(params.values()))))
    maml_loss, _ = meta_batch(_learner("maml", model).meta_loss)(params, whole)
    trained = {"train_maml": _train("maml", 3, mode="vmap"), "train_protonet": _train("protonet", 3, mode="loop")}
    for result in ranks:
        for mode in ("vmap", "loop"):
            assert tree_relative_error(result[f"backward_{mode}"], reference) < 1e-10, mode
            assert tree_relative_error(result[f"sharded_{mode}"], reference) < 1e-10, mode
            assert abs(result[f"loss_{mode}"].item() - maml_loss.item()) < 1e-12 * abs(maml_loss.item())
        assert tree_relative_error(result["grads_fn"], fo_reference) < 1e-10
        for name, single in trained.items():
            assert tree_relative_error(result[name], single) < 1e-10, name
            assert tree_relative_error(result[name], _setup(name.split("_")[1])[0]) > 1e-3, name   # training moved the parameters


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_dead_or_hung_rank_stops_the_other_within_the_timeout_and_the_run_resumes(tmp_path, fault, float64):
    timeout, steps = 4.0, 12
    procs = _launch(2, "worker_train", str(tmp_path), str(steps), str(timeout), "0")
    ckpt = tmp_path / "checkpoint.pt"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:       # wait until training is under way (a checkpoint at step >= 3)
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 3:
            break
        assert procs[0].poll() is None, procs[0].communicate()
        time.sleep(0.05)
    else:
        pytest.fail("training did not reach step 3")
    os.kill(procs[1].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    t0 = time.time()
    try:
        _, err = procs[0].communicate(timeout=timeout + 60)
    finally:
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].wait()
    assert procs[0].returncode != 0
    assert "all_reduce of the meta-gradient" in err and "failed on rank 0 of 2 (gloo, timeout 4s)" in err, err
    assert "another rank died, hung or stopped answering" in err
    detected = float(err.split("error at ")[1].split(":")[0]) - t0     # when rank 0 raised, after the fault
    assert detected < timeout + 3, (detected, err)
    if fault == "hang":
        assert detected >= timeout - 0.5 and "Timed out" in err, (detected, err)

    saved = torch.load(ckpt, weights_only=True)            # the last complete checkpoint is intact
    assert 3 <= saved["step"] < steps
    if fault == "hang":
        return                                             # resuming is shown once, after the kill
    # resume with another number of ranks (the stream of meta-batches does not depend on it)
    resumed = _launch(1, "worker_train", str(tmp_path), str(steps), str(timeout), "1")
    for rc, log in _finish(resumed):
        assert rc == 0, log
    final = torch.load(ckpt, weights_only=True)
    assert final["step"] == steps
    uninterrupted = _train("maml", steps)
    assert tree_relative_error(final["params"], uninterrupted) < 1e-10


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
