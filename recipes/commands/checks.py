"""What the standalone commands share: the error a command refuses with, and the output folder a command owns.

A :class:`CommandError` is a refusal with the argument or file and the reason in its message; ``python -m recipes``
prints it as one line (``python -m recipes <command>: error: ...``) and exits with status 2, like an argument
error. Every command writes into a new or empty folder, or clears it with ``--overwrite``
(:func:`check_output_dir`, then :func:`claim_output_dir` once the inputs have loaded).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class CommandError(ValueError):
    """A command refuses its input or output; the message names the argument or file and the reason."""


def check_output_dir(path: str | Path, what: str, overwrite: bool = False) -> Path:
    """Refuse ``path`` as an output folder unless it is new, empty, or ``overwrite`` (then it will be cleared); an
    existing file, a non-empty folder without ``overwrite`` or a parent that cannot be written is a
    :class:`CommandError` naming ``what`` (the argument, e.g. ``--out``). Checks only; nothing is written yet."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CommandError(f"{what}={str(path)!r} is an existing file; give a folder to write into")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        shown = ", ".join(sorted(p.name for p in path.iterdir())[:3])
        raise CommandError(f"{what}={str(path)!r} is not empty (holds {shown}); choose a new folder or pass "
                           "--overwrite to replace what it holds")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK):
        raise CommandError(f"{what}={str(path)!r} cannot be written ({existing} is read-only); choose another folder")
    return path


def claim_output_dir(path: str | Path, what: str, overwrite: bool = False) -> Path:
    """``path`` checked by :func:`check_output_dir`, created, and emptied first when ``overwrite``."""
    path = check_output_dir(path, what, overwrite)
    if path.is_dir() and overwrite:
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path
