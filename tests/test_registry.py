"""One registry, one meta-step contract, checks as data, and a layout whose import graph has no cycles.

The registry (``metafunc.LEARNERS``), the CLI's ``--algorithm`` choices, the bench's paths and the contract cases
must name the same learners; every registered learner trains from the CLI; the learner options come from the
factories' signatures; no module imports a private name of another, the import graph has no cycle and
``import metafunc`` loads no trainer, CLI or ``torch.distributed`` code.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from learner_cases import CASES

import metafunc as mf
from metafunc.cli import build_parser, main
from metafunc.registry import LEARNERS, learner_for_path, path_names, register_learner
from metafunc.step import resolve_workers

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "metafunc"


# ---------------------------------------------------------------------------------------------------------------
# the registry and who reads it
# ---------------------------------------------------------------------------------------------------------------

def test_registry_cli_choices_bench_paths_and_contract_cases_agree():
    names = list(LEARNERS)
    assert len(names) == 14 and {"imaml", "checkpointed_maml", "one_step"} <= set(names)
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    [algorithm] = [a for a in train_parser._actions if a.dest == "algorithm"]
    assert list(algorithm.choices) == names
    assert {case.learner for case in CASES} == set(names)
    assert path_names() == ["exact", "first_order", "checkpointed", "one_step", "implicit"]
    assert [learner_for_path(p).name for p in path_names()] == ["maml", "fomaml", "checkpointed_maml", "one_step",
                                                                 "imaml"]
    assert not hasattr(mf, "GRADIENT_PATHS") and not hasattr(mf, "build_learner_by_name")   # one way to build


def test_train_help_lists_every_learner_and_every_learner_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name in LEARNERS:
        assert name in text
    for flag in ("--lam", "--cg-iterations", "--checkpoints", "--clip-norm", "--two-pass",
                 "--head-lr", "--fce, --no-fce", "--adapt"):
        assert flag in text, flag


@pytest.mark.parametrize("name", list(LEARNERS))
def test_every_registered_learner_trains_from_the_cli(name, tmp_path, capsys):
    out = tmp_path / name
    code = main(["train", "--algorithm", name, "--dataset", "synthetic", "--iterations", "1", "--width", "8",
                 "--meta-batch", "2", "--val-episodes", "2", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "val"]
    assert torch.isfinite(torch.tensor(records[0]["loss"]))
    assert json.loads((out / "config.json").read_text())["algorithm"] == name


def test_learner_options_reach_the_factory_and_wrong_ones_are_refused(tmp_path, capsys):
    from metafunc.train import TrainConfig, build_experiment, resolve_config

    cfg = resolve_config(TrainConfig(algorithm="checkpointed_maml", dataset="synthetic", width=8, inner_steps=4,
                                     options={"checkpoints": 2}))
    learner = build_experiment(cfg).learner
    assert learner.name == "checkpointed_maml"
    code = main(["train", "--algorithm", "maml", "--dataset", "synthetic", "--lam", "2", "--iterations", "1",
                 "--no-progress", "--out", str(tmp_path)])
    assert code == 2
    assert "maml takes no option(s) ['lam']; its options are: adapt, first_order" in capsys.readouterr().err
    code = main(["train", "--algorithm", "checkpointed_maml", "--dataset", "synthetic", "--inner-steps", "3",
                 "--checkpoints", "9", "--iterations", "1", "--no-progress", "--out", str(tmp_path)])
    assert code == 2
    assert "checkpoints must be between 1 and steps=3 (got 9)" in capsys.readouterr().err


def test_options_are_read_from_the_signature_of_a_new_learner():
    def my_maml(model, *, inner_lr: float = 0.4, loss="cross_entropy", rounds: int = 2, damp: float | None = None):
        return mf.maml(model, inner_lr=inner_lr, steps=rounds, loss=loss)

    spec = register_learner("my_maml_for_test", my_maml)
    try:
        assert [(o.name, o.kind, o.default, o.optional) for o in spec.options] == [
            ("rounds", int, 2, False), ("damp", float, None, True)]
        model, _ = mf.functionalize(mf.models.mlp())
        assert spec.build(model, inner_lr=0.1, steps=5, ways=3, rounds=3).name == "maml"   # steps/ways: not taken
        with pytest.raises(TypeError, match=r"my_maml_for_test: unknown option\(s\) \['lam'\]; its options are: "
                                            r"rounds, damp"):
            spec.build(model, lam=1.0)
        with pytest.raises(ValueError, match="'my_maml_for_test' is registered already; pass replace=True"):
            register_learner("my_maml_for_test", my_maml)
    finally:
        del LEARNERS["my_maml_for_test"]
    with pytest.raises(ValueError, match="register_learner: name must be an identifier"):
        register_learner("my maml", my_maml)
    with pytest.raises(ValueError, match="gradient path 'exact' is implemented by 'maml' already"):
        register_learner("other_exact", my_maml, path="exact")


# ---------------------------------------------------------------------------------------------------------------
# one meta-step contract
# ---------------------------------------------------------------------------------------------------------------

def _tiny(float64=True):
    torch.manual_seed(0)
    model, params = mf.functionalize(mf.models.mlp(4, (6,), 3, norm="layer"))
    if float64:
        params = {k: v.detach().double().requires_grad_(True) for k, v in params.items()}
        model.module.double()
    labels = torch.tensor([[0, 0, 1, 1, 2, 2]] * 3)
    gen = torch.Generator().manual_seed(1)
    dtype = torch.float64 if float64 else torch.float32
    tasks = mf.Task(torch.randn(3, 6, 4, generator=gen, dtype=dtype), labels,
                    torch.randn(3, 6, 4, generator=gen, dtype=dtype), labels)
    return model, params, tasks


def test_every_step_returns_loss_metrics_grads_equal_to_backward_of_the_meta_batch(float64):
    from metafunc import distributed

    model, params, tasks = _tiny()
    learner = mf.maml(model, inner_lr=0.3, steps=2)
    loss, metrics = mf.meta_batch(learner, mode="loop")(params, tasks)
    reference = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    steps = {"default": mf.meta_value_and_grad(learner), "default-vmap": mf.meta_value_and_grad(learner, mode="vmap"),
             "sharded(default)": distributed.sharded(mf.meta_value_and_grad(learner, mode="loop"))}
    for name, step in steps.items():
        got_loss, got_metrics, grads = step(params, tasks)
        assert mf.tree.tree_relative_error(grads, reference) < 1e-12, name
        assert abs(float(got_loss) - float(loss)) < 1e-12 and set(got_metrics) == set(metrics), name
    mf.apply_grads(params, grads)
    assert all(torch.equal(params[k].grad, grads[k]) for k in params)


def test_the_trainer_takes_the_default_step(tmp_path, monkeypatch):
    """``metafunc train`` differentiates task by task (meta_value_and_grad), not meta_batch + backward."""
    from metafunc.train import loop

    calls = []
    real = loop.meta_value_and_grad

    def spy(per_task, **kwargs):
        calls.append((per_task, kwargs))
        return real(per_task, **kwargs)

    monkeypatch.setattr(loop, "meta_value_and_grad", spy)
    assert main(["train", "--dataset", "synthetic", "--iterations", "1", "--width", "8", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    # mode="auto": one step measures the plan on a probe meta-batch, then the trainer's step runs with that plan
    [(probe, probe_kwargs), (learner, kwargs)] = calls
    assert probe is learner and isinstance(learner, mf.MetaLearner) and learner.name == "maml"
    assert probe_kwargs.get("mode", "auto") == "auto" and kwargs["mode"] in ("loop", "vmap")
    saved = mf.train.checkpoint.load_checkpoint(tmp_path / "checkpoint.pt")["plan"]
    assert (saved["mode"], saved["chunk_size"]) == (kwargs["mode"], kwargs["chunk_size"])


# ---------------------------------------------------------------------------------------------------------------
# checks as data
# ---------------------------------------------------------------------------------------------------------------

def test_checks_travel_with_the_learner_and_a_plain_callable_gets_the_generic_ones():
    model, params, tasks = _tiny(float64=False)
    learner = mf.maml(model, inner_lr=0.3)
    bad = tasks._replace(query_y=tasks.query_y + 5)               # labels past the 3 outputs
    for fn in (learner, learner.meta_loss, mf.with_steps(learner.evaluate, 2)):
        with pytest.raises(ValueError, match=r"maml: task.query_y has labels in \[5, 7\] but the model has 3 outputs"):
            mf.meta_batch(fn, mode="loop")(params, bad)
    with pytest.raises(ValueError, match=r"maml: task.query_y has labels in \[5, 7\]"):
        mf.meta_value_and_grad(learner)(params, bad)
    assert isinstance(learner.meta_loss, mf.TaskFunction) and learner.validate is learner.meta_loss.validate
    wrapped = functools.partial(learner.meta_loss)                # a plain callable: generic checks, one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(2)                                      # another test's CLI run may have set 1
    try:
        assert learner.thread_safe() and resolve_workers(learner.meta_loss, tasks, mode="loop", workers=None) == 2
        assert resolve_workers(wrapped, tasks, mode="loop", workers=None) == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="meta_batch: task.support_x and task.support_y disagree"):
        mf.meta_batch(wrapped, mode="loop")(params, tasks._replace(support_y=tasks.support_y[:, :3]))
    with pytest.raises(TypeError, match="meta_batch: per_task must be a MetaLearner or callable"):
        mf.meta_batch(42)


# ---------------------------------------------------------------------------------------------------------------
# the layout
# ---------------------------------------------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, str, int]]]:
    """``module -> [(imported module, imported name or '', line)]`` for every import of a metafunc module, at any
    depth of the file (lazy imports inside functions included)."""
    out: dict[str, list[tuple[str, str, int]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        found = out.setdefault(name, [])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}:{node.lineno}: relative import"
                if node.module and node.module.split(".")[0] == "metafunc":
                    for alias in node.names:
                        found.append((node.module, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "metafunc":
                        found.append((alias.name, "", node.lineno))
    return out


def _private_owner(module: str) -> str | None:
    """The package that owns a private module (``metafunc.algorithms`` for ``metafunc.algorithms._metric``), or
    None for a public module and for ``metafunc._shared``, the one private module every subpackage may use."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and module != "metafunc._shared":
            return ".".join(parts[:i])
    return None


def test_no_module_imports_a_private_name_of_another():
    offenders = [f"{mod}:{line}: from {src} import {name}" for mod, imports in _imports().items()
                 for src, name, line in imports if name.startswith("_") and src != mod]
    assert not offenders, offenders
    packages = {mod: mod if (PACKAGE / Path(*mod.split(".")[1:]) / "__init__.py").exists() else mod.rsplit(".", 1)[0]
                for mod in _imports()}
    outside = [f"{mod}:{line}: from {src} import {name}" for mod, imports in _imports().items()
               for src, name, line in imports
               if (owner := _private_owner(src)) is not None
               and not (packages[mod] == owner or packages[mod].startswith(owner + "."))]
    assert not outside, f"private modules imported from another package (make the names public): {outside}"


def test_the_import_graph_has_no_cycles():
    modules = set(_imports())
    graph: dict[str, set[str]] = {}

    def ancestors(name: str) -> list[str]:   # the subpackages whose __init__ runs on importing ``name``
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(2, len(parts))]

    for mod, imports in _imports().items():
        targets = set()
        for src, name, _ in imports:
            target = f"{src}.{name}" if f"{src}.{name}" in modules else src
            if target != mod and target in modules:
                targets.add(target)
                # importing metafunc.core.types from outside metafunc.core first runs metafunc/core/__init__.py
                own = set(ancestors(mod)) | ({mod} if (PACKAGE / Path(*mod.split(".")[1:]) / "__init__.py").exists()
                                             else set())
                targets.update(a for a in ancestors(target) if a not in own and a != mod)
        graph[mod] = targets
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_layers_show_in_the_folders():
    for folder in ("core", "step", "algorithms", "gradients", "nn", "data", "distributed", "train", "cli"):
        assert (PACKAGE / folder / "__init__.py").is_file(), folder
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "_shared.py", "registry.py"], flat


def test_import_metafunc_stays_light():
    code = ("import sys, metafunc as mf; mf.maml, mf.meta_batch, mf.functionalize, mf.LEARNERS; "
            "print(sorted(m for m in sys.modules if m.startswith(('metafunc.train', 'metafunc.cli', "
            "'metafunc.distributed', 'metafunc.text', 'torch.distributed.run', 'matplotlib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


# ---------------------------------------------------------------------------------------------------------------
# torchrun with a CUDA device (faked): the branch that died with NameError before its first step
# ---------------------------------------------------------------------------------------------------------------

def test_torchrun_with_a_cuda_device_gives_each_rank_its_gpu(tmp_path, monkeypatch):
    from metafunc import distributed
    from metafunc.cli import train as cli_train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    seen = {}

    def fake_init(*, backend, timeout, device):
        seen["init_device"] = device
        return distributed.DistInfo(1, 2, 1, "nccl", torch.device("cuda", 1), timeout)

    def fake_train(cfg, **kwargs):
        seen["device"], seen["kwargs"] = cfg.device, kwargs
        return None

    monkeypatch.setattr(distributed, "init_distributed", fake_init)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli_train, "train", fake_train)
    code = main(["train", "--dataset", "synthetic", "--device", "cuda", "--iterations", "1", "--no-progress",
                 "--out", str(tmp_path)])
    assert code == 0
    assert seen["init_device"] == "cuda" and seen["device"] == "cuda:1"
    assert seen["kwargs"]["wrap_step"] is distributed.sharded and seen["kwargs"]["is_main"] is False


def _contributing_example() -> tuple[str, str]:
    """The module code and the registry line of CONTRIBUTING.md's "Adding a learner" example."""
    import re

    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text[text.index("## Adding a learner"):]
    module_code, registry_line = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:2]
    return module_code, registry_line


def _run_example_module(module_code: str):
    import types

    module = types.ModuleType("tempered_maml")
    exec(compile(module_code, "CONTRIBUTING.md", "exec"), module.__dict__)
    return module


def test_the_worked_example_of_contributing_md_uses_the_public_learner_base(float64):
    """The example imports public names only (``metafunc._shared`` is the one shared private module), and the
    learner it builds is right: dividing the support loss by T is MAML with inner_lr / T, and T = 1 is MAML."""
    module_code, _ = _contributing_example()
    imports = [node for node in ast.walk(ast.parse(module_code)) if isinstance(node, ast.ImportFrom)]
    private = [f"from {node.module} import {a.name}" for node in imports for a in node.names
               if node.module and node.module.startswith("metafunc") and node.module != "metafunc._shared"
               and (any(p.startswith("_") for p in node.module.split(".")) or a.name.startswith("_"))]
    assert not private, private
    assert any(node.module == "metafunc.algorithms.base" for node in imports)
    tempered_maml = _run_example_module(module_code).tempered_maml
    torch.manual_seed(0)
    model, params = mf.functionalize(mf.models.mlp(4, (8,), 3, norm="layer"))
    g = torch.Generator().manual_seed(1)
    tasks = mf.Task(torch.randn(3, 6, 4, generator=g), torch.randint(0, 3, (3, 6), generator=g),
                    torch.randn(3, 6, 4, generator=g), torch.randint(0, 3, (3, 6), generator=g))
    for temperature in (1.0, 4.0):
        loss, _, grads = mf.meta_value_and_grad(tempered_maml(model, inner_lr=0.4, steps=2,
                                                              temperature=temperature))(params, tasks)
        ref_loss, _, ref = mf.meta_value_and_grad(mf.maml(model, inner_lr=0.4 / temperature, steps=2))(params, tasks)
        assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=0)
        assert mf.tree.tree_relative_error(grads, ref) < 1e-12, temperature
    with pytest.raises(ValueError, match=r"^tempered_maml: temperature must be > 0 \(got 0\)"):
        tempered_maml(model, temperature=0)


def test_the_worked_example_of_contributing_md_is_one_file_plus_one_registry_entry(tmp_path, capsys):
    """CONTRIBUTING.md's "Adding a learner" example, run as written: the module, the registry line, then the CLI
    trains it with its own option as a flag."""
    module_code, registry_line = _contributing_example()
    module = _run_example_module(module_code)
    entry = eval(registry_line.strip().rstrip(","), {"tempered_maml": module.tempered_maml})
    register_learner(entry[0], entry[1], needs_head=entry[2], path=entry[3], description=entry[4])
    try:
        assert [o.name for o in LEARNERS["tempered_maml"].options] == ["temperature"]
        code = main(["train", "--algorithm", "tempered_maml", "--temperature", "4", "--dataset", "synthetic",
                     "--iterations", "1", "--width", "8", "--no-progress", "--out", str(tmp_path)])
        assert code == 0, capsys.readouterr().err
        assert json.loads((tmp_path / "config.json").read_text())["options"] == {"temperature": 4.0}
    finally:
        del LEARNERS["tempered_maml"]
