"""The one reader of the collection's Lightning checkpoints (resume rule, ``export``, ``restore``, evaluation, GRPO's
``sft_checkpoint``): a file that cannot be read or identified is an error naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, unreadable, or of a different model or recipe."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load ``path`` on the CPU (memory-mapped, tensors not read); an unreadable file is a :class:`CheckpointError`
    naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # truncated zip, bad pickle, wrong format: all mean "cannot resume from this file"
        size = path.stat().st_size
        raise CheckpointError(f"Checkpoint {path} ({size} bytes) is truncated or corrupt and cannot be loaded: "
                              f"{type(err).__name__}: {err}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"Checkpoint {path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt
