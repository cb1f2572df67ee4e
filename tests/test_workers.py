"""Several tasks at once on CPU threads (``meta_value_and_grad(..., workers=)``): the same bits as one task at a time,
the exact meta-gradient, safe calls of a functionalized model from several threads, and when ``workers=None`` picks
more than one."""

from __future__ import annotations

import copy
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from test_fast_paths import LR, _conv4, _reference, _tasks

from metafunc import Task, functionalize, maml, meta_value_and_grad, models, protonet
from metafunc.core.functional import thread_safe
from metafunc.core.tree import tree_relative_error
from metafunc.step import default as fast

f32 = torch.float32


def _float32_case(n=5):
    torch.manual_seed(0)
    model, params = functionalize(models.conv4(ways=3, width=8, image_size=16, norm="batch"))
    g = torch.Generator().manual_seed(2)
    tasks = Task(torch.randn(n, 3, 1, 16, 16, generator=g), torch.arange(3).repeat(n, 1),
                 torch.randn(n, 9, 1, 16, 16, generator=g), torch.arange(3).repeat(n, 3))
    return model, params, tasks


@pytest.mark.parametrize("workers", [2, 3, 8])
@pytest.mark.parametrize("channels_last", [False, True])
def test_workers_agree_with_one_task_at_a_time_and_repeat_bitwise(workers, channels_last):
    model, params, tasks = _float32_case()
    learner = maml(model, inner_lr=LR, steps=2)
    one = meta_value_and_grad(learner.meta_loss, mode="loop", workers=1)(params, tasks)
    step = meta_value_and_grad(learner.meta_loss, mode="loop", workers=workers, channels_last=channels_last)
    many, again = step(params, tasks), step(params, tasks)
    # each worker runs its kernels on its own intra-op threads, so sums may be cut differently: float32 rounding
    assert tree_relative_error(many[2], one[2]) < 1e-5
    torch.testing.assert_close(many[0], one[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(many[1]["accuracy"], one[1]["accuracy"])
    # ... but a given setting gives the same bits every time: tasks are summed in order, whichever finishes first
    assert torch.equal(many[0], again[0])
    assert all(torch.equal(many[2][k], again[2][k]) for k in params)


def test_worker_threads_do_not_change_the_callers_thread_count():
    model, params, tasks = _float32_case(4)
    learner = maml(model, inner_lr=LR, steps=1)
    before = torch.get_num_threads()
    meta_value_and_grad(learner.meta_loss, workers=2)(params, tasks)
    assert torch.get_num_threads() == before
    seen = []
    with ThreadPoolExecutor(1) as pool:  # a thread started afterwards gets the caller's count, not the workers'
        seen.append(pool.submit(torch.get_num_threads).result())
    assert seen == [before]


@pytest.mark.parametrize("first_order", [False, True])
def test_workers_give_the_float64_reference_meta_gradient(first_order):
    model, params = functionalize(_conv4())
    tasks = _tasks(3)
    learner = maml(model, inner_lr=LR, steps=2, first_order=first_order)
    got = meta_value_and_grad(learner.meta_loss, workers=2)(params, tasks)[2]
    assert tree_relative_error(got, _reference(params, tasks, steps=2, first_order=first_order)) < 1e-10


def test_workers_for_protonets_match_the_vmapped_meta_gradient():
    torch.manual_seed(0)
    encoder, params = functionalize(torch.nn.Sequential(_conv4().features, torch.nn.Flatten()))
    tasks = _tasks(4)
    learner = protonet(encoder)
    threaded = meta_value_and_grad(learner.meta_loss, workers=2)(params, tasks)[2]
    vmapped = meta_value_and_grad(learner.meta_loss, mode="vmap")(params, tasks)[2]
    assert tree_relative_error(threaded, vmapped) < 1e-10


def test_an_error_in_one_task_reaches_the_caller_from_its_thread():
    model, params, tasks = _float32_case(4)
    learner = maml(model, inner_lr=LR, steps=1)
    calls = []

    def per_task(p, task):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise ArithmeticError("task 3 failed")
        return learner.meta_loss(p, task)

    with pytest.raises(ArithmeticError, match="task 3 failed"):
        meta_value_and_grad(per_task, workers=2)(params, tasks)
    assert any(name.startswith("metafunc-task") for name in calls)


def test_workers_none_picks_two_for_learners_and_one_where_threads_are_not_known_to_be_safe(monkeypatch):
    model, params, tasks = _float32_case(4)
    learner = maml(model, inner_lr=LR, steps=1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    resolve = fast.resolve_workers
    assert resolve(learner.meta_loss, tasks, mode="loop", workers=None, params=params) == 2
    assert resolve(learner.meta_loss, Task(*(t[:1] for t in tasks)), mode="loop", workers=None, params=params) == 1  # one task
    assert resolve(learner.meta_loss, tasks, mode="vmap", workers=None, params=params) == 1
    assert resolve(lambda p, t: learner.meta_loss(p, t), tasks, mode="loop", workers=None, params=params) == 1
    assert resolve(lambda p, t: learner.meta_loss(p, t), tasks, mode="loop", workers=3, params=params) == 3
    assert resolve(learner.meta_loss, tasks, mode="loop", workers=16, params=params) == 4  # at most one per task
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve(learner.meta_loss, tasks, mode="loop", workers=None, params=params) == 1
    inside = torch.func.grad(lambda x: x * resolve(learner.meta_loss, tasks, mode="loop", workers=None,
                                                   params=params))(torch.tensor(1.0))
    assert float(inside) == 1.0  # under a torch.func transform: one thread
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert resolve(learner.meta_loss, tasks, mode="loop", workers=None, params=params) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(fast, "available_memory", lambda device: 1_000_000)  # 1 MB free: two tasks do not fit
    assert resolve(learner.meta_loss, tasks, mode="loop", workers=None, params=params) == 1


def test_models_with_dropout_or_attention_are_not_run_on_several_threads_by_default():
    dropout, _ = functionalize(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)))
    assert not thread_safe(dropout)
    dropout.module.eval()
    assert thread_safe(dropout)
    attention, _ = functionalize(torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=8))
    assert not thread_safe(attention)
    assert not thread_safe(lambda p, x: x)


def test_a_functionalized_model_gives_the_same_outputs_from_many_threads_at_once():
    torch.manual_seed(0)
    model, params = functionalize(torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(),
                                                      torch.nn.Linear(32, 4)))
    inputs = [torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) for i in range(64)]
    shifted = [{k: v + 0.01 * i for k, v in params.items()} for i in range(64)]
    expected = [model(p, x) for p, x in zip(shifted, inputs)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: model(shifted[i], inputs[i]), range(64)))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


class _ScaledByMode(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x) * (2.0 if self.training else 3.0)


def test_a_thread_replica_follows_train_and_eval_of_the_module():
    torch.manual_seed(0)
    model, params = functionalize(_ScaledByMode())
    x = torch.randn(8, 4)
    expected_train = model(params, x)
    model.module.eval()
    expected_eval = model(params, x)
    model.module.train()
    with ThreadPoolExecutor(1) as pool:
        train = pool.submit(model, params, x).result()
        model.module.eval()
        evaluated = pool.submit(model, params, x).result()
    assert torch.equal(train, expected_train)
    assert torch.equal(evaluated, expected_eval)
    assert not torch.allclose(train, evaluated)


def test_a_functionalized_model_can_be_copied_and_pickled():
    model, params = functionalize(torch.nn.Linear(3, 2))
    x = torch.randn(4, 3)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(params, x), model(params, x))
        with ThreadPoolExecutor(1) as pool:
            torch.testing.assert_close(pool.submit(clone, params, x).result(), model(params, x))


def test_bad_workers_are_refused_before_anything_runs():
    model, _, _ = _float32_case(2)
    learner = maml(model, inner_lr=LR)
    with pytest.raises(ValueError, match=r"^meta_value_and_grad: workers must be"):
        meta_value_and_grad(learner.meta_loss, workers=0)
    with pytest.raises(TypeError, match=r"^meta_value_and_grad: workers must be"):
        meta_value_and_grad(learner.meta_loss, workers=1.5)
    with pytest.raises(ValueError, match=r"^meta_value_and_grad: workers=2 runs tasks on threads, which needs "
                                         r"mode='loop' or 'auto' \(got mode='vmap'\)"):
        meta_value_and_grad(learner.meta_loss, mode="vmap", workers=2)


def test_grad_mode_of_the_caller_reaches_the_worker_threads():
    model, params, tasks = _float32_case(2)
    seen = []

    def per_task(p, task):
        seen.append(torch.is_grad_enabled())
        return F.cross_entropy(model(p, task.query_x), task.query_y)

    for workers in (1, 2):  # under no_grad there is no graph to differentiate, on the caller's thread or a worker's
        seen.clear()
        with torch.no_grad(), pytest.raises(RuntimeError, match="does not require grad"):
            meta_value_and_grad(per_task, workers=workers)(params, tasks)
        assert seen and not any(seen), workers  # a new thread starts with grad mode on: it must get the caller's


def test_a_meta_step_inside_a_task_on_a_worker_thread_runs_inline_instead_of_waiting_on_the_pool():
    model, params, tasks = _float32_case(4)
    learner = maml(model, inner_lr=LR, steps=1)
    inner_step = meta_value_and_grad(learner.meta_loss, workers=2)
    inner_workers = []

    def per_task(p, task):  # a task whose loss is itself a meta-step over a small meta-batch
        one = Task(*(t[None] for t in task))
        two = Task(*(torch.cat([t, t]) for t in one))
        inner_workers.append(fast.resolve_workers(learner.meta_loss, two, mode="loop", workers=2, params=p))
        return inner_step(p, one)[0] + learner.meta_loss(p, task)[0]

    loss, _, grads = meta_value_and_grad(per_task, workers=2)(params, tasks)
    assert inner_workers == [1, 1, 1, 1]
    expected = meta_value_and_grad(learner.meta_loss, workers=1)(params, tasks)
    assert tree_relative_error(grads, expected[2]) < 1e-5


def _record_starts(spacing, workers=2, tasks=6, seconds=0.2):
    """Run ``tasks`` fake tasks of ``seconds`` each through the loop's scheduler: their (start, end) times."""
    times: dict[int, tuple[float, float]] = {}

    def task(i, _):
        start = time.perf_counter()
        time.sleep(seconds)
        times[i] = (start, time.perf_counter())
        return i

    order = list(fast._in_order(task, [(i, i + 1) for i in range(tasks)], workers, spacing))
    return order, [times[i] for i in range(tasks)]


def test_tasks_in_flight_start_spread_over_a_task_so_their_memory_peaks_do_not_coincide():
    # The first call has no timing yet: task 1 waits until task 0 has finished (and so been timed).
    spacing = fast._Spacing()
    order, times = _record_starts(spacing)
    assert order == list(range(6))
    assert times[1][0] >= times[0][1]
    assert spacing.seconds is not None and spacing.seconds >= 0.2
    # Later calls: each task starts at least half a task (the median timed duration over 2 workers) after the last.
    order, times = _record_starts(spacing)
    assert order == list(range(6))
    gaps = [b[0] - a[0] for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.5 * 0.2 - 1e-3, gaps
    assert times[1][0] < times[0][1]  # ... and no later than needed: the second task overlaps the first


def test_spacing_is_the_median_of_the_last_tasks_timed():
    spacing = fast._Spacing()
    assert spacing.seconds is None
    for seconds in (0.3, 0.1, 0.2, 9.0, 0.2):
        spacing.add(seconds)
    assert spacing.seconds == 0.2
    for seconds in (1.0, 1.0, 1.0):  # only the last five count
        spacing.add(seconds)
    assert spacing.seconds == 1.0


def test_timings_are_kept_for_a_bounded_number_of_signatures():
    spacings: dict = {}
    first = fast._spacing_of(spacings, "a", keep=3)
    assert fast._spacing_of(spacings, "a", keep=3) is first
    for key in "bcd":
        fast._spacing_of(spacings, key, keep=3)
    assert list(spacings) == ["b", "c", "d"]  # the oldest went
