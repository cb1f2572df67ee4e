"""Checkpoints: written atomically (temp file + ``os.replace``), read with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (nothing that needs unpickling code):

* ``"format"``: ``"metafunc-checkpoint"`` and ``"version"``: the layout version;
* ``"config"``: the run's settings (JSON-able), ``"iteration"``: meta-iterations done;
* ``"params"``: the meta-parameters, ``"optimizer"``: the outer optimizer's ``state_dict()``;
* ``"rng"``: generator states (``torch.ByteTensor``), and anything else the caller adds.

A crash while saving never leaves a corrupt file under the checkpoint's name: the bytes go to a temporary file in
the same folder, are flushed to disk and loaded back, and only then renamed over the old checkpoint in one atomic
step; the old one stays beside it as ``checkpoint.prev.pt``. Non-finite parameters are never written.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from metafunc.core.types import Params

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CheckpointError", "PREVIOUS_SUFFIX", "previous_path",
           "save_checkpoint", "load_checkpoint", "check_compatible",
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


class CheckpointError(RuntimeError):
    """Writing a checkpoint failed (disk full, permission denied, a file that does not load back); the previous
    checkpoint is intact.

    Example:
        >>> isinstance(CheckpointError("disk full"), RuntimeError)
        True
    """


PREVIOUS_SUFFIX = ".prev.pt"
"""``checkpoint.pt``'s previous generation is kept beside it as ``checkpoint.prev.pt``."""


def previous_path(path: str | os.PathLike) -> Path:
    """Where the previous generation of checkpoint ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``.

    Example:
        >>> previous_path("runs/x/checkpoint.pt").name
        'checkpoint.prev.pt'
    """
    path = Path(path)
    return path.with_name(path.name[: -len(path.suffix)] + PREVIOUS_SUFFIX if path.suffix else path.name + PREVIOUS_SUFFIX)


def _nonfinite_params(state: Mapping[str, Any]) -> list[str]:
    params = state.get("params")
    if not isinstance(params, Mapping):
        return []
    return [k for k, v in params.items() if isinstance(v, Tensor) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], *, keep_previous: bool = True) -> Path:
    """Write ``state`` (plus the format tag) to ``path`` so that a loadable checkpoint exists at every instant.

    1. Parameters that are not finite are refused (``ValueError``): a diverged state never replaces a good one.
    2. The bytes go to a temporary file beside ``path``, are fsynced, and the file is loaded back
       (``weights_only=True``) and checked before anything is renamed.
    3. With ``keep_previous``, the current ``path`` is hard-linked to ``checkpoint.prev.pt`` (``path`` itself stays in
       place), then the verified file is moved over ``path`` with :func:`os.replace`.

    An ``OSError`` on the way (``ENOSPC``, ``EACCES``, ...) or a file that does not load back removes the temporary
    file and raises :class:`CheckpointError` saying what failed; ``path`` and ``checkpoint.prev.pt`` are untouched.

    Example:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> p = save_checkpoint(os.path.join(folder, "ckpt.pt"), {"params": {"w": torch.zeros(2)}, "iteration": 3})
        >>> p = save_checkpoint(p, {"params": {"w": torch.ones(2)}, "iteration": 4})
        >>> load_checkpoint(p)["iteration"], load_checkpoint(previous_path(p))["iteration"]
        (4, 3)
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"save_checkpoint: state must be a dict (got {type(state).__name__})")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"save_checkpoint: path {str(path)!r} is a folder; give a file name such as {str(path / 'checkpoint.pt')!r}")
    bad = _nonfinite_params(state)
    if bad:
        raise ValueError(f"save_checkpoint: the parameters {bad[:6]} are not finite (NaN or inf); refusing to write "
                         f"them over {str(path)!r}, which keeps the last good state")
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.writing")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        back = torch.load(tmp, map_location="cpu", weights_only=True)
        if back.get("format") != CHECKPOINT_FORMAT or back.get("iteration") != payload.get("iteration"):
            raise CheckpointError(f"save_checkpoint: {str(tmp)!r} did not read back as the checkpoint just written")
        if keep_previous and path.exists():
            prev, link = previous_path(path), path.with_name(f".{path.name}.{os.getpid()}.prev")
            if link.exists():
                link.unlink()
            os.link(path, link)
            os.replace(link, prev)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as e:  # an interrupt too: never leave the temporary file behind
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(e, CheckpointError) or not isinstance(e, (OSError, RuntimeError, pickle.UnpicklingError)):
            raise
        reason = f"{e.strerror} (errno {e.errno})" if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"save_checkpoint: writing {str(path)!r} failed: {reason}; the previous checkpoint "
                              f"{str(path)!r} is intact") from e
    return path


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable (the folder's entries), where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


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
