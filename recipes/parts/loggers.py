"""The collection's default loggers: CSV always, W&B offline by default, one directory per run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

WANDB_MODES = ("offline", "online", "disabled")


def default_loggers(root: str | Path, name: str, wandb: str = "offline", project: str = "layerwise-recipes") -> list:
    """A versioned ``CSVLogger`` (first, so ``trainer.log_dir`` is unique per run) plus a ``WandbLogger``.

    W&B files go inside the CSV run directory, so the config each run saves never collides with another
    run's. The CSV writer is created first, while that directory is still empty.
    """
    if wandb not in WANDB_MODES:
        raise ValueError(f"wandb must be one of {WANDB_MODES}, got {wandb!r}")
    csv = CSVLogger(save_dir=str(root), name=name)
    loggers: list[Logger] = [csv]
    if wandb != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
        _ = csv.experiment  # creates the run directory (rank zero) before W&B writes into it
        run_dir = Path(csv.log_dir)
        run_dir.mkdir(parents=True, exist_ok=True)  # other ranks: W&B's own directory argument must exist
        loggers.append(_WandbLogger(project=project, name=f"{name}/{run_dir.name}", save_dir=str(run_dir),
                                    offline=wandb == "offline"))
    return loggers


class _WandbLogger(WandbLogger):
    """``WandbLogger`` minus the ``anonymous`` setting: Lightning always passes it and recent W&B releases warn that
    it has no effect."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        getattr(self, "_wandb_init", {}).pop("anonymous", None)


def check_log_dir(root: str | Path, min_free_mb: int = 100) -> None:
    """Fail at start, not after hours of training, when ``root`` is not writable or its disk is (nearly) full."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise OSError(f"Log directory {root} is not writable ({err.strerror or err}); set trainer.default_root_dir "
                      "to a writable directory") from err
    free_mb = shutil.disk_usage(root).free / 2**20
    if free_mb < min_free_mb:
        raise OSError(f"Only {free_mb:.0f} MB free on the disk of log directory {root}; at least {min_free_mb} MB are "
                      "needed for logs and checkpoints (free space, move trainer.default_root_dir, or lower "
                      "--min_free_mb)")
