"""One meta-step of MAML and ProtoNets in each library, on the same module and tasks, for ``benchmarks/peers.py``.

Every implementation is a module with ``AVAILABLE`` (bool), ``WHY`` (why it is not, else ``""``) and two builders:

* ``maml_step(module, tasks, *, inner_lr, steps, first_order) -> step``
* ``protonet_step(module, tasks) -> step`` (or ``None`` when the library has no ProtoNet API)

``step()`` runs one meta-step (forward, inner loop, outer backward) and returns the meta-gradient of the mean query
loss over the tasks as ``{parameter name: tensor}``, so the benchmark can check it against the plain loop before
timing it. Each follows the library's own MAML example: in higher, learn2learn and TorchOpt, tasks one at a time, each
task's query loss back-propagated as soon as it is computed (the memory-lean idiom of their examples); in
parallel-metalearn, all tasks at once under its ``torch.func.vmap`` (its default backend).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["IMPLEMENTATIONS", "load"]

IMPLEMENTATIONS = {
    "plain": "plain_loop",
    "metafunc": "metafunc_impl",
    "higher": "higher_impl",
    "learn2learn": "learn2learn_impl",
    "torchopt": "torchopt_impl",
    "parallel_metalearn": "parallel_metalearn_impl",
}
"""Benchmark name -> module in this package."""


def load(name: str) -> ModuleType:
    """Import the implementation module behind a benchmark name."""
    return importlib.import_module(f"{__name__}.{IMPLEMENTATIONS[name]}")
