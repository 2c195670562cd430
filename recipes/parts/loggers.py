"""The collection's default loggers: CSV always, W&B offline by default, one directory per run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

WANDB_MODES = ("offline", "online", "disabled")


def claim_run_dir(parent: str | Path, prefix: str = "version_") -> Path:
    """Create and return ``parent/<prefix><n>`` for the next free ``n``.

    The folder is claimed with an exclusive ``mkdir``, so two runs started at the same moment never share one.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(p.name[len(prefix):]) for p in parent.iterdir() if p.name.startswith(prefix)
                 and p.name[len(prefix):].isdigit()]
        path = parent / f"{prefix}{max(taken, default=-1) + 1}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue  # another run took it between the listing and the mkdir


def default_loggers(root: str | Path, name: str, wandb: str = "offline", project: str = "layerwise-recipes") -> list:
    """A ``CSVLogger`` in a freshly claimed ``root/name/version_N`` plus a ``WandbLogger`` (group ``name/version_N``).

    W&B files go inside the run directory, so the config each run saves never collides with another run's.
    """
    _check_mode(wandb)
    if _rank() != 0:  # other DDP ranks never write; the trainer broadcasts rank 0's log_dir
        return _loggers(CSVLogger(save_dir=str(root), name=name), name, wandb, project, job_type="fit")
    run_dir = claim_run_dir(Path(root) / name)
    version = int(run_dir.name.removeprefix("version_"))
    return _loggers(CSVLogger(save_dir=str(root), name=name, version=version), f"{name}/{run_dir.name}", wandb,
                    project, job_type="fit")


def eval_loggers(ckpt_path: str | Path, stage: str, wandb: str = "offline",
                 project: str = "layerwise-recipes") -> list:
    """Loggers for ``validate``/``test`` of a checkpoint: ``<run dir>/eval/<stage>_N`` inside the checkpoint's run
    folder (the folder above ``checkpoints/``), and a W&B run in the same group as the training run."""
    _check_mode(wandb)
    ckpt_path = Path(ckpt_path)
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    if _rank() != 0:
        return _loggers(CSVLogger(save_dir=str(run_dir), name="eval", version=stage), "", wandb, project, stage)
    eval_dir = claim_run_dir(run_dir / "eval", prefix=f"{stage}_")
    group = f"{run_dir.parent.name}/{run_dir.name}"
    csv = CSVLogger(save_dir=str(run_dir), name="eval", version=eval_dir.name)
    return _loggers(csv, group, wandb, project, job_type=stage, run_name=f"{group}/{eval_dir.name}")


def _loggers(csv: CSVLogger, group: str, wandb: str, project: str, job_type: str,
             run_name: str | None = None) -> list[Logger]:
    loggers: list[Logger] = [csv]
    if wandb != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
        loggers.append(WandbLogger(project=project, name=run_name or group, group=group, job_type=job_type,
                                   save_dir=csv.log_dir, offline=wandb == "offline"))
    return loggers


def _rank() -> int:
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _check_mode(wandb: str) -> None:
    if wandb not in WANDB_MODES:
        raise ValueError(f"wandb must be one of {WANDB_MODES}, got {wandb!r}")


def remove_unused_run_dir(run_dir: str | Path, loggers: list[Logger]) -> None:
    """Delete ``run_dir``, claimed by :func:`default_loggers` for a run that failed before its first optimizer
    step (it holds no results); its W&B run is closed first."""
    if _rank() != 0:
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish(exit_code=1)
    shutil.rmtree(run_dir, ignore_errors=True)


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
