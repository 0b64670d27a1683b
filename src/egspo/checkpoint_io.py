"""Checkpoints written atomically: a kill during a save leaves the previous checkpoint intact.

`atomic_torch_save` (and `AtomicCheckpointIO`, the same as a Lightning checkpoint writer) writes
to a temporary file beside the target, fsyncs it and renames it over the target, never leaving a
truncated file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `torch.save` checkpoint writer, made atomic for local paths.

    Lightning's own writer serialises to memory first but then writes the bytes over the
    target in place, so a kill in the middle of the write can leave a truncated `last.ckpt`.
    A rename within one directory is atomic on POSIX. Remote paths use Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or type(get_filesystem(path)).__name__ != "LocalFileSystem":
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, Path(path))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save(obj, path)` such that `path` is always either its old or its new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (the directory entry), where the OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
