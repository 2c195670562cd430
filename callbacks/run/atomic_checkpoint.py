"""Checkpoint writes that never destroy the previous good file, on any local or network filesystem.

Lightning's default writer stages the file in ``$TMPDIR`` and moves it over the target; when the run folder is on
another filesystem that move is a copy into the target itself, so a kill or a full disk leaves a truncated target
and a leaked temporary file. :class:`AtomicCheckpointIO` writes the bytes into a hidden file next to the target
(same directory, so same filesystem), flushes and fsyncs it, renames it over the target (atomic under POSIX) and
fsyncs the directory. On any error the hidden file is removed and the target is untouched.
"""

from __future__ import annotations

import errno
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

TEMP_MARK = ".tmp."


def _temp_name(target: Path) -> Path:
    # hidden and not ending in .ckpt, so no glob for checkpoints ever picks a half-written file
    return target.with_name(f".{target.name}{TEMP_MARK}{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temporary files that a killed writer on this host left in ``directory``; returns what was removed."""
    directory, host, removed = Path(directory), socket.gethostname(), []
    if not directory.is_dir():
        return removed
    for path in directory.glob(f".*{TEMP_MARK}*"):
        parts = path.name.split(TEMP_MARK, 1)[1].rsplit(".", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if int(parts[1]) != os.getpid() and not _pid_alive(int(parts[1])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_errno(err: BaseException | None) -> int | None:
    """The errno of ``err`` or of the OSError it was raised from (torch's zip writer wraps a full disk in a
    RuntimeError)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno is not None:
            return err.errno
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` that either replaces ``path`` with the complete new file or leaves it untouched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(target.parent)
    temp = _temp_name(target)
    try:
        with open(temp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException as err:
        temp.unlink(missing_ok=True)
        if _os_errno(err) in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(errno.ENOSPC, f"No space left on device while writing checkpoint {target}; the previous "
                                        "file (if any) is intact. Free space or move the run folder") from err
        if _os_errno(err) == errno.EXDEV:
            raise OSError(errno.EXDEV, f"Could not rename the checkpoint into {target} (cross-device rename); the "
                                       "previous file (if any) is intact") from err
        raise
    _fsync_dir(target.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes go through :func:`atomic_torch_save`; remote URLs keep Lightning's
    own transactional upload."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """Where the run's checkpoints go: the first ModelCheckpoint's folder, else ``<log_dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
