"""Sinusoid regression tasks of the MAML paper: ranges, shapes, seeded reproducibility."""

from __future__ import annotations

import math

import torch

from metafunc import Task, sinusoid_tasks
from metafunc.data.sinusoid import AMPLITUDE_RANGE, INPUT_RANGE, PHASE_RANGE, SinusoidTasks


def _sample(seed=0, **kwargs):
    return sinusoid_tasks(200, shots=10, generator=torch.Generator().manual_seed(seed), return_parameters=True, **kwargs)


def test_shapes_and_types():
    tasks = sinusoid_tasks(4, shots=5, queries=7, generator=torch.Generator().manual_seed(0))
    assert isinstance(tasks, Task)
    assert tasks.support_x.shape == tasks.support_y.shape == (4, 5, 1)
    assert tasks.query_x.shape == tasks.query_y.shape == (4, 7, 1)
    assert tasks.num_tasks == 4 and tasks.support_x.dtype == torch.float32
    default = sinusoid_tasks(2, shots=3, generator=torch.Generator().manual_seed(0))
    assert default.query_x.shape == (2, 3, 1)  # queries defaults to shots
    wide = sinusoid_tasks(2, shots=3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in wide)


def test_ranges_of_the_maml_paper():
    assert AMPLITUDE_RANGE == (0.1, 5.0) and PHASE_RANGE == (0.0, math.pi) and INPUT_RANGE == (-5.0, 5.0)
    sampled = _sample()
    assert isinstance(sampled, SinusoidTasks)
    amplitude, phase, task = sampled.amplitude, sampled.phase, sampled.task
    assert amplitude.shape == phase.shape == (200,)
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0 and amplitude.max() - amplitude.min() > 4.0
    assert 0.0 <= phase.min() and phase.max() <= math.pi and phase.max() - phase.min() > 2.5
    xs = torch.cat([task.support_x, task.query_x], 1)
    assert -5.0 <= xs.min() and xs.max() <= 5.0 and xs.max() - xs.min() > 9.5
    assert (xs.mean() - 0.0).abs() < 0.2  # roughly uniform on [-5, 5]


def test_targets_are_the_sinusoids():
    task, amplitude, phase = _sample(seed=3)
    a, p = amplitude[:, None, None], phase[:, None, None]
    assert torch.allclose(task.support_y, a * torch.sin(task.support_x - p), atol=1e-6)
    assert torch.allclose(task.query_y, a * torch.sin(task.query_x - p), atol=1e-6)
    assert (task.query_y.abs() <= a + 1e-6).all()


def test_same_seed_same_tasks_and_another_seed_differs():
    a, b, c = _sample(seed=7), _sample(seed=7), _sample(seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.task, b.task))
    assert torch.equal(a.amplitude, b.amplitude)
    assert not torch.equal(a.task.support_x, c.task.support_x)
    # The generator is the only source of randomness: the global seed does not matter.
    torch.manual_seed(123)
    d = _sample(seed=7)
    assert torch.equal(a.task.query_y, d.task.query_y)


def test_support_and_query_points_are_distinct_draws():
    task = _sample().task
    assert not torch.equal(task.support_x, task.query_x)
    g = torch.Generator().manual_seed(0)
    first, second = sinusoid_tasks(3, generator=g), sinusoid_tasks(3, generator=g)
    assert not torch.equal(first.support_x, second.support_x)  # the generator advances
