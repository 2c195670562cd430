"""Log the seed and the library versions with every run, so any result can be traced to its environment."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

PACKAGES = ("layerwise-recipes", "torch", "lightning", "transformers", "timm", "peft", "torchmetrics", "tokenizers")


def run_info() -> dict[str, str | int | None]:
    """The global seed (as set by ``seed_everything``), Python and the versions of the libraries that matter."""
    info: dict[str, str | int | None] = {"seed": _seed(), "python": platform.python_version()}
    for name in PACKAGES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    return info


def _seed() -> int | None:
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None else None


class RunInfoLogger(Callback):
    """Sends :func:`run_info` to every logger as hyperparameters and writes ``run_info.json`` in the log dir."""

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        info = run_info()
        for logger in trainer.loggers:
            logger.log_hyperparams({"run_info": info})
        log_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        if trainer.is_global_zero and log_dir is not None:
            path = Path(log_dir) / "run_info.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(info, indent=2) + "\n")
