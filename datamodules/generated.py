"""Generated default data (synthetic tasks, phantom X-rays) written once, atomically, into a folder keyed by what
generated it, so runs started at the same time never read each other's half-written files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = ".generated.json"


def _canonical(kind: str, key: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({"kind": kind, **key}, sort_keys=True, default=list))


def keyed_dir(base: str | Path, kind: str, key: dict[str, Any]) -> Path:
    """``<base>/<kind>-<hash of key>``: one folder per distinct generator setting (seed, sizes, tasks, ...)."""
    blob = json.dumps(_canonical(kind, key), sort_keys=True).encode()
    return Path(base) / f"{kind}-{hashlib.sha256(blob).hexdigest()[:12]}"


def is_complete(folder: Path, kind: str, key: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a finished generation for exactly this ``kind`` and ``key``."""
    try:
        return json.loads((folder / MARKER).read_text()) == _canonical(kind, key)
    except (OSError, ValueError):
        return False


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _remove_abandoned(target: Path, older_than_s: float = 3600.0) -> None:
    """Staging folders of writers killed mid-generation (nothing this small takes an hour to write)."""
    for staging in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if time.time() - staging.stat().st_mtime > older_than_s:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError:
            pass


def generate_once(base: str | Path, kind: str, key: dict[str, Any], write: Callable[[Path], Any]) -> Path:
    """Return the keyed folder for ``(kind, key)``, writing it with ``write(folder)`` first when missing.

    ``write`` fills a private staging folder next to the target; the staging folder gets a marker, is fsynced
    and renamed into place in one step. When another process finished first, its folder is used and ours
    discarded. An existing complete folder is used as is, also when it is read-only.
    """
    target = keyed_dir(base, kind, key)
    if is_complete(target, kind, key):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise OSError(err.errno, f"Cannot write the generated {kind} data into {target.parent} "
                                 f"({err.strerror or err}); point the data module's folder option to a writable "
                                 "folder, or generate it there once from a machine that can write") from err
    try:
        write(staging)
        (staging / MARKER).write_text(json.dumps(_canonical(kind, key), sort_keys=True))
        _fsync_tree(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete(target, kind, key):  # not a lost race with another writer: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
