"""Checkpoints: written atomically (temp file + ``os.replace``), read with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (nothing that needs unpickling code):

* ``"format"``: ``"metafunc-checkpoint"`` and ``"version"``: the layout version;
* ``"config"``: the run's settings (JSON-able), ``"iteration"``: meta-iterations done;
* ``"params"``: the meta-parameters, ``"optimizer"``: the outer optimizer's ``state_dict()``;
* ``"rng"``: generator states (``torch.ByteTensor``), and anything else the caller adds.

A crash while saving never leaves a corrupt file under the checkpoint's name: the bytes go to a temporary file in
the same folder, are flushed to disk, and only then renamed over the old checkpoint in one atomic step.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from metafunc._shared import save_atomic
from metafunc.core.types import Params

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "check_compatible",
           "param_signature"]

CHECKPOINT_FORMAT = "metafunc-checkpoint"
CHECKPOINT_VERSION = 1


def param_signature(params: Mapping[str, Tensor]) -> dict[str, list[int]]:
    """``{name: shape}`` of a parameter tree, the fingerprint a checkpoint is matched against.

    Example:
        >>> param_signature({"head.weight": torch.zeros(5, 64)})
        {'head.weight': [5, 64]}
    """
    return {k: list(v.shape) for k, v in params.items()}


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` (plus the format tag) to ``path`` atomically and return the path.

    The data goes to a temporary file next to ``path`` which is fsynced and then moved over ``path`` with
    :func:`os.replace`; if anything fails, the temporary file is removed and the previous checkpoint is untouched.

    Example:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> p = save_checkpoint(os.path.join(folder, "ckpt.pt"), {"params": {"w": torch.zeros(2)}, "iteration": 3})
        >>> load_checkpoint(p)["iteration"]
        3
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"save_checkpoint: state must be a dict (got {type(state).__name__})")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"save_checkpoint: path {str(path)!r} is a folder; give a file name such as {str(path / 'checkpoint.pt')!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    return save_atomic(payload, path)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``torch.load(..., weights_only=True)``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not a metafunc checkpoint
    (not a torch file, truncated, or a torch file without the metafunc format tag).

    Example:
        >>> import tempfile, os
        >>> p = save_checkpoint(os.path.join(tempfile.mkdtemp(), "c.pt"), {"iteration": 1})
        >>> load_checkpoint(p)["format"]
        'metafunc-checkpoint'
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {str(path)!r}; check the path (training writes "
                                "OUT/checkpoint.pt)")
    if path.is_dir():
        raise ValueError(f"load_checkpoint: {str(path)!r} is a folder; pass the checkpoint file, e.g. "
                         f"{str(path / 'checkpoint.pt')!r}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            UnicodeDecodeError, AttributeError, ImportError, KeyError, TypeError) as e:
        raise ValueError(
            f"load_checkpoint: {str(path)!r} is not a metafunc checkpoint (torch.load could not read it: "
            f"{type(e).__name__}); pass a file written by "
            "`metafunc train` (OUT/checkpoint.pt)"
        ) from e
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        found = f"a dict with keys {sorted(map(str, data))[:6]}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"load_checkpoint: {str(path)!r} is a torch file but not a metafunc checkpoint (found {found}, no "
            f"format tag {CHECKPOINT_FORMAT!r}); pass a file written by `metafunc train` (OUT/checkpoint.pt)"
        )
    version = data.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ValueError(f"load_checkpoint: {str(path)!r} has checkpoint version {version!r}; this metafunc reads "
                         f"versions up to {CHECKPOINT_VERSION} (upgrade metafunc)")
    return data


def check_compatible(checkpoint: Mapping[str, Any], params: Params, *, config: Mapping[str, Any] | None = None,
                     keys: tuple[str, ...] = (), caller: str = "load_checkpoint") -> None:
    """Raise ``ValueError`` when a checkpoint belongs to another model (parameter names or shapes differ) or to
    another run configuration (any of ``keys`` differs between ``checkpoint["config"]`` and ``config``).

    Example:
        >>> ckpt = {"params": {"w": torch.zeros(2)}, "config": {"ways": 5}}
        >>> check_compatible(ckpt, {"w": torch.ones(2)}, config={"ways": 5}, keys=("ways",))
    """
    saved = checkpoint.get("params")
    if not isinstance(saved, dict):
        raise ValueError(f"{caller}: the checkpoint holds no parameter dict under 'params'")
    mine, theirs = param_signature(params), param_signature(saved)
    if mine != theirs:
        missing = sorted(set(mine) - set(theirs))
        extra = sorted(set(theirs) - set(mine))
        shapes = {k: (theirs[k], mine[k]) for k in mine if k in theirs and theirs[k] != mine[k]}
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}")
        if extra:
            parts.append(f"unexpected {extra[:4]}")
        if shapes:
            parts.append("shapes differ " + ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in
                                                      [(k, *v) for k, v in list(shapes.items())[:3]]))
        raise ValueError(f"{caller}: the checkpoint is from another model ({'; '.join(parts)}); use the settings it "
                         "was trained with (they are stored in its 'config') or train a new one")
    if config is not None and keys:
        saved_config = checkpoint.get("config") or {}
        diff = {k: (saved_config.get(k), config.get(k)) for k in keys if saved_config.get(k) != config.get(k)}
        if diff:
            text = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{caller}: the checkpoint is from another configuration ({text}); pass the same "
                             "settings or start a new run in another --out folder")
