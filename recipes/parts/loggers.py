"""The collection's default loggers: CSV always, W&B offline by default, one directory per run."""

from __future__ import annotations

import csv
import os
import shutil
import uuid
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from recipes.parts.wandb_files import last_step

WANDB_MODES = ("offline", "online", "disabled")


class _ContinuingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv``: rows from before the first step logged now stay, later rows (work lost
    since the checkpoint, about to be logged again) are dropped, and new rows are appended."""

    def _check_log_dir_exists(self) -> None:
        self._old_rows: list[dict] | None = None
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self._old_rows = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def save(self) -> None:
        if self._old_rows is not None and self.metrics:
            first = min(m["step"] for m in self.metrics)
            keep = [r for r in self._old_rows if r.get("step") not in (None, "") and float(r["step"]) < first]
            with open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(keep)
            self._old_rows = None
        super().save()


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` for a resumed run that continues in its own version folder: ``metrics.csv`` goes on from the
    step reached instead of being deleted."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


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


def point_latest(run_dir: str | Path) -> None:
    """Make ``<run name>/latest`` a symlink to ``run_dir`` (``version_N``), replaced atomically, so a command can
    name the run that was just created (``runs/sft/latest/checkpoints``) whatever its number."""
    run_dir = Path(run_dir)
    link, tmp = run_dir.parent / "latest", run_dir.parent / f".latest-{uuid.uuid4().hex}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # a file system without symlinks: the numbered folder is still there
        tmp.unlink(missing_ok=True)


def wandb_run_id(run_dir: str | Path) -> str | None:
    """The W&B run id of a run folder, created once (by rank 0; other ranks do not log to W&B) and kept in
    ``wandb_id.txt``, so a resumed run logs to the same W&B run."""
    path = Path(run_dir) / "wandb_id.txt"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    if rank_zero_only.rank != 0:
        return None
    run_id = uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def default_loggers(root: str | Path, name: str, wandb: str = "offline", project: str = "layerwise-recipes",
                    version: str | None = None) -> list:
    """A versioned ``CSVLogger`` (first, so ``trainer.log_dir`` is unique per run) plus a ``WandbLogger``.

    W&B files go inside the CSV run directory, so the config each run saves never collides with another
    run's. The CSV writer is created first, while that directory is still empty. ``version`` (``version_N``)
    continues that existing run folder: its ``metrics.csv`` goes on from the step reached and W&B resumes the
    same run id. A new run's folder is claimed atomically (:func:`claim_run_dir`) by rank 0; the W&B run's group
    is ``<name>/version_N``, shared with evaluations of its checkpoints (:func:`eval_loggers`); ``<name>/latest``
    points to the newest run (:func:`point_latest`).
    """
    _check_mode(wandb)
    if version is not None:
        csv_logger = ContinuingCSVLogger(save_dir=str(root), name=name, version=version)
    elif _rank() == 0:
        run_dir = claim_run_dir(Path(root) / name)
        point_latest(run_dir)
        csv_logger = CSVLogger(save_dir=str(root), name=name, version=int(run_dir.name.removeprefix("version_")))
    else:  # other DDP ranks never write; the trainer broadcasts rank 0's log_dir
        csv_logger = CSVLogger(save_dir=str(root), name=name)
    return _with_wandb(csv_logger, f"{name}/{Path(csv_logger.log_dir).name}", wandb, project, job_type="fit")


def eval_loggers(ckpt_path: str | Path, stage: str, wandb: str = "offline", project: str = "layerwise-recipes",
                 eval_root: str | Path | None = None, fallback_root: str | Path = "runs") -> list:
    """Loggers for ``validate``/``test`` of a checkpoint, in ``<folder>/eval/<stage>_N`` and a W&B run in the
    training run's group. ``<folder>`` is the checkpoint's run folder (the one above ``checkpoints/``); with
    ``eval_root``, or when that run folder cannot be written (a read-only copy of someone's run), it is
    ``<eval_root or fallback_root>/<run name>/<version>`` instead."""
    _check_mode(wandb)
    ckpt_path = Path(ckpt_path)
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    run_dir = run_dir.resolve() if run_dir.is_symlink() else run_dir  # runs/sft/latest: the version it names
    group = f"{run_dir.parent.name}/{run_dir.name}"
    folder = run_dir
    if eval_root is not None or not os.access(run_dir, os.W_OK):
        folder = Path(eval_root if eval_root is not None else fallback_root) / run_dir.parent.name / run_dir.name
    if _rank() != 0:
        return _with_wandb(CSVLogger(save_dir=str(folder), name="eval", version=stage), group, wandb, project,
                           job_type=stage)
    eval_dir = claim_run_dir(folder / "eval", prefix=f"{stage}_")
    csv_logger = CSVLogger(save_dir=str(folder), name="eval", version=eval_dir.name)
    return _with_wandb(csv_logger, group, wandb, project, job_type=stage, run_name=f"{group}/eval/{eval_dir.name}")


def _with_wandb(csv_logger: CSVLogger, group: str, wandb: str, project: str, job_type: str,
                run_name: str | None = None) -> list[Logger]:
    loggers: list[Logger] = [csv_logger]
    if wandb != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
        _ = csv_logger.experiment  # creates the run directory (rank zero) before W&B writes into it
        run_dir = Path(csv_logger.log_dir)
        run_dir.mkdir(parents=True, exist_ok=True)  # other ranks: W&B's own directory argument must exist
        loggers.append(_WandbLogger(project=project, name=run_name or group, group=group, job_type=job_type,
                                    save_dir=str(run_dir), offline=wandb == "offline", id=wandb_run_id(run_dir),
                                    resume="allow"))
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
    link = Path(run_dir).parent / "latest"
    if link.is_symlink() and not link.exists():  # it named the removed folder: the newest one left, or none
        left = sorted((p for p in link.parent.glob("version_*") if p.name[8:].isdigit()), key=lambda p: int(p.name[8:]))
        link.unlink()
        if left:
            point_latest(left[-1])


class _WandbLogger(WandbLogger):
    """``WandbLogger`` minus the ``anonymous`` setting (Lightning always passes it and recent W&B releases warn that
    it has no effect), and, offline, continuing the history steps of the offline runs already in its folder: a
    resumed run's ``_step`` goes on from where the interrupted one stopped instead of restarting at 0 (online,
    W&B's server does that)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        getattr(self, "_wandb_init", {}).pop("anonymous", None)
        offline = kwargs.get("offline") or os.environ.get("WANDB_MODE") == "offline"
        self._continue_after = last_step(kwargs["save_dir"]) if offline and _rank() == 0 else None

    @property
    @rank_zero_experiment
    def experiment(self):
        run = WandbLogger.experiment.fget(self)
        if self._continue_after is not None:
            start, self._continue_after = self._continue_after + 1, None
            run.log({}, step=start, commit=False)  # the next row is step `start`
        return run


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
