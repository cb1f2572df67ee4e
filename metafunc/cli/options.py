"""The settings of ``metafunc train``: config files, and the learner options as flags read from the registry."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from metafunc.registry import LEARNERS, LearnerOption
from metafunc.train.config import TrainConfig

__all__ = ["load_config_file", "train_config_from_args", "add_learner_option_flags", "learner_option_flags",
           "learner_options_from_args"]

_ALIASES = {"steps": "iterations"}
_OPTION_PREFIX = "option_"


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run configuration from JSON (``.json``) or TOML (``.toml``); keys are :class:`TrainConfig` fields
    (``meta_batch`` or ``meta-batch``; ``steps`` means ``iterations``).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "cfg.json")
        >>> _ = open(p, "w").write('{"algorithm": "fomaml", "meta-batch": 4}')
        >>> load_config_file(p)
        {'algorithm': 'fomaml', 'meta_batch': 4}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metafunc train: config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, tomllib.TOMLDecodeError
        raise ValueError(f"metafunc train: cannot parse config file {str(path)!r} "
                         f"({'TOML' if path.suffix.lower() == '.toml' else 'JSON'}): {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"metafunc train: config file {str(path)!r} must hold a table/object of settings "
                         f"(got {type(data).__name__})")
    fields = _field_names()
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if name not in fields:
            raise ValueError(f"metafunc train: unknown setting {key!r} in {str(path)!r}; known settings: "
                             f"{', '.join(sorted(fields))}")
        out[name] = value
    return out



def learner_option_flags() -> dict[str, tuple[LearnerOption, list[str]]]:
    """Every learner option of the registry once: ``name -> (option, learners that take it)``.

    Example:
        >>> flags = learner_option_flags()
        >>> flags["lam"][1], flags["checkpoints"][1]
        (['imaml'], ['checkpointed_maml'])
    """
    out: dict[str, tuple[LearnerOption, list[str]]] = {}
    for spec in LEARNERS.values():
        for option in spec.options:
            if option.name in out:
                out[option.name][1].append(spec.name)
            else:
                out[option.name] = (option, [spec.name])
    return out


def learner_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The learner options given as flags (those added by :func:`add_learner_option_flags`), by option name.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_learner_option_flags(p)
        >>> learner_options_from_args(p.parse_args(["--checkpoints", "7"]))
        {'checkpoints': 7}
    """
    return {k[len(_OPTION_PREFIX):]: v for k, v in vars(args).items()
            if k.startswith(_OPTION_PREFIX) and v is not None}


def _parse_selector(text: str) -> Any:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else parts


def add_learner_option_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per learner option of the registry (``--lam``, ``--checkpoints``, ``--two-pass``, ...), typed
    from the factories' signatures; the values land in ``TrainConfig.options``.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_learner_option_flags(p)
        >>> p.parse_args(["--lam", "2", "--two-pass"]).option_lam
        2.0
    """
    group = parser.add_argument_group("learner options (read from each learner's factory; see metafunc.LEARNERS)")
    for name, (option, learners) in learner_option_flags().items():
        flag = "--" + name.replace("_", "-")
        used_by = ", ".join(learners)
        default = f"default {option.default!r}" if option.default is not None else "default: the learner's choice"
        kwargs: dict[str, Any] = {"dest": _OPTION_PREFIX + name, "default": None}
        if option.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            help_text = f"{used_by} ({default})"
        elif option.kind in (int, float, str):
            kwargs["type"] = option.kind
            kwargs["metavar"] = name.upper()
            if option.choices:
                kwargs["choices"] = option.choices
            help_text = f"{used_by} ({default})"
        else:  # parameter selectors: a name prefix, or comma-separated prefixes
            kwargs["type"] = _parse_selector
            kwargs["metavar"] = "PREFIX[,PREFIX...]"
            help_text = f"{used_by}: parameters chosen by name prefix ({default})"
        group.add_argument(flag, help=help_text, **kwargs)


def train_config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None):
    """Merge settings: ``base`` (a checkpoint's config), then ``--config``, then the flags that were given.

    Example:
        >>> from metafunc.cli import build_parser
        >>> args = build_parser().parse_args(["train", "--shots", "5"])
        >>> train_config_from_args(args).shots
        5
    """
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for name in _field_names():
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    values["options"] = {**(values.get("options") or {}), **learner_options_from_args(args)}
    values = {k: v for k, v in values.items() if k in _field_names()}
    return TrainConfig(**values)


