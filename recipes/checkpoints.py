"""The one reader of the collection's Lightning checkpoints (resume rule, ``export``, ``restore``, evaluation, GRPO's
``sft_checkpoint``): a file that cannot be read or identified is an error naming it.

A checkpoint names the LightningModule class it was saved from: each of our modules writes its class path under
:data:`MODULE_CLASS_KEY` (:func:`record_module_class`, from its ``on_save_checkpoint``); checkpoints written before
that are identified by the ``_class_path`` hyper-parameter that ``python -m recipes`` (LightningCLI) saves.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection
from pathlib import Path
from typing import Any

import lightning as L
import torch

MODULE_CLASS_KEY = "module_class_path"


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


def record_module_class(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Write ``module``'s class path into ``checkpoint`` (call it from the module's ``on_save_checkpoint``), so
    the checkpoint says what it is."""
    checkpoint[MODULE_CLASS_KEY] = f"{type(module).__module__}.{type(module).__qualname__}"


def import_class(class_path: str) -> type:
    """The class named by a dotted ``class_path`` (``recipes.causal_lm.CausalLMModule``, ``recipes.GRPOModule``)."""
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise ImportError(f"{class_path!r} is not a dotted class path")
    cls = getattr(importlib.import_module(module_name), name, None)
    if not isinstance(cls, type):
        raise ImportError(f"{module_name} has no class {name!r}")
    return cls


def module_class(ckpt: dict[str, Any], path: str | Path) -> type[L.LightningModule]:
    """The LightningModule class the checkpoint ``ckpt`` (loaded from ``path``) records; a checkpoint that records
    none, or a class that no longer imports, is a :class:`CheckpointError` naming the file."""
    recorded = ckpt.get(MODULE_CLASS_KEY) or (ckpt.get("hyper_parameters") or {}).get("_class_path")
    if not recorded:
        raise CheckpointError(f"Checkpoint {path} does not record its LightningModule class (neither "
                              f"'{MODULE_CLASS_KEY}' nor the '_class_path' hyper-parameter); it was not written by "
                              "this collection's modules or python -m recipes")
    try:
        cls = import_class(recorded)
    except ImportError as err:
        raise CheckpointError(f"Checkpoint {path} is of {recorded}, which cannot be imported: {err}") from err
    if not issubclass(cls, L.LightningModule):
        raise CheckpointError(f"Checkpoint {path} records {recorded}, which is not a LightningModule")
    return cls


def load_module(path: str | Path, classes: Collection[type[L.LightningModule]] | None = None) -> L.LightningModule:
    """``<Module>.load_from_checkpoint(path)`` on the CPU, in eval mode, for the class the checkpoint records;
    with ``classes``, a checkpoint of another class is a :class:`CheckpointError` naming the file (before its
    weights are read)."""
    cls = module_class(load_checkpoint(path), path)
    if classes is not None and cls not in classes:
        known = sorted(f"{c.__module__}.{c.__qualname__}" for c in classes)
        raise CheckpointError(f"Checkpoint {path} is of {cls.__module__}.{cls.__qualname__}; expected one of {known}")
    try:  # our own checkpoints hold hyper-parameter objects: not weights_only (said, so torch does not warn)
        return cls.load_from_checkpoint(path, map_location="cpu", weights_only=False).eval()
    except Exception as err:  # weights of another architecture, a missing hyper-parameter, ...: name the file
        reason = " ".join(str(err).split())[:400]
        raise CheckpointError(f"Checkpoint {path} does not load into {cls.__qualname__}: {type(err).__name__}: "
                              f"{reason}") from err
