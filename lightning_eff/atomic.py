"""Atomic writes (checkpoints, JSON results): a crash mid-save never leaves a truncated file behind.

Part of the floor (imports nothing from ``lightning_eff``): every layer that writes a file uses it.


Lightning's default ``TorchCheckpointIO`` streams into the target file, so a process killed
mid-write (OOM, pre-emption, Ctrl-C) leaves a corrupt ``last.ckpt`` in place of the previous
good one. We write to a temporary file in the same directory and ``os.replace`` it, which is
atomic on POSIX filesystems.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor

__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "atomic_write", "write_results"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(fh)`` on a temp file next to ``path``, fsync, then ``os.replace`` it into place.

    On any failure the temp file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` through a temp file + ``os.replace`` (no partial file on failure)."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose ``save_checkpoint`` is atomic (temp file + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:  # noqa: D102
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_torch_save(checkpoint, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, Tensor):
        return _jsonable(value.item() if value.numel() == 1 else value.tolist())
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist())  # numpy scalars and arrays
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN / inf are not valid JSON
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def write_results(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as JSON atomically: a temp file in the same directory, then ``os.replace``.

    A crash mid-write leaves the previous file intact (never a truncated one). Tensors and numpy
    scalars become numbers, NaN/inf become ``null``, other objects their ``str``.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(payload), indent=2, sort_keys=False, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path

