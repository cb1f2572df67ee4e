"""The one private module of helpers that several subpackages share: eager checks of user input (errors name the
caller, the argument and the fix), whether a ``torch.func`` transform is running, and atomic file writes."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_positive", "check_steps", "check_nonnegative", "check_choice", "under_func_transform", "save_atomic", "atomic_write_text",
           "strict_json", "json_safe", "load_attr", "file_mode"]


def under_func_transform() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...) is running around this call (also
    True on a torch without the functorch interpreter stack, where the ``torch.func`` code path is the safe one)."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is None or peek() is not None


def file_mode() -> int:
    """The mode a new file gets from ``open()`` under the current umask (``0o666 & ~umask``, usually ``0o644``):
    every file metafunc writes atomically gets it too, so a run's files all share one mode."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _replace_atomically(path: str | os.PathLike, mode: str, write: Any) -> Path:
    """Call ``write(file)`` on a temp file beside ``path`` opened with ``mode``, fsync, then ``os.replace`` it onto
    ``path``; on any error the temp file is removed and ``path`` is left as it was. The file gets
    :func:`file_mode` (``mkstemp`` alone would leave it ``0o600``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def save_atomic(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` into a temp file in the same folder, fsync, then ``os.replace``: a crash never leaves a
    half-written file at ``path`` (the previous file, if any, stays intact)."""
    return _replace_atomically(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temp file beside ``path``, fsync, then ``os.replace`` (readers see the old or the new
    file, never half of one)."""
    return _replace_atomically(path, "w", lambda f: f.write(text))


def check_positive(caller: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{caller}: {name} must be a number (got {type(value).__name__} {value!r})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{caller}: {name} must be > 0 (got {value})")
    return float(value)


def check_nonnegative(caller: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{caller}: {name} must be a number (got {type(value).__name__} {value!r})")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{caller}: {name} must be >= 0 (got {value})")
    return float(value)


def check_steps(caller: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{caller}: {name} must be an int (got {type(value).__name__} {value!r})")
    if value < minimum:
        raise ValueError(f"{caller}: {name} must be >= {minimum} (got {value})")
    return value


def check_choice(caller: str, name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{caller}: {name} must be one of {', '.join(map(repr, choices))} (got {value!r})")
    return value




def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by ``None``, in nested dicts, lists and tuples:
    what strict JSON readers accept (``NaN`` is not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(value)`` with ``allow_nan=False``: every file metafunc writes parses
    with a strict JSON reader; a non-finite number is written as ``null``."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def load_attr(spec: str, *, caller: str, flag: str, what: str) -> Any:
    """The object ``module:attr`` names (``attr`` may be dotted), imported with the current folder on ``sys.path``;
    errors name ``caller``, the ``flag`` and what was expected (``what``), never a bare ``ImportError``.

    Example:
        >>> load_attr("os.path:join", caller="metafunc train", flag="--model", what="a model factory").__name__
        'join'
    """
    module_name, _, attr = str(spec).partition(":")
    if not module_name or not attr:
        raise ValueError(f"{caller}: {flag} must be 'module:attr' naming {what} (got {spec!r})")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{caller}: cannot import {module_name!r} for {flag} {spec!r} ({e}); run from the folder "
                         "that holds it or put it on PYTHONPATH") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{caller}: module {module_name!r} has no attribute {attr!r} ({flag} {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{caller}: {flag} {spec!r} is not callable; name {what}")
    return obj
