"""Save ``last.ckpt`` every N minutes of wall-clock time or every M optimizer steps, whichever comes first."""

from __future__ import annotations

from time import monotonic
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from callbacks.run.atomic_checkpoint import checkpoint_dir


class PeriodicLastCheckpoint(Callback):
    """Bounds the work a kill can lose: ``last.ckpt`` in the run's checkpoint folder is rewritten (atomically, with
    :class:`~callbacks.run.atomic_checkpoint.AtomicCheckpointIO`) after a training step when ``every_n_minutes``
    have passed or ``every_n_steps`` optimizer steps were taken since the last save, and once more when the fit ends.

    Saves happen only where the state is whole: after a batch that took an optimizer step (with gradient
    accumulation, the end of a window; the gradients of a partial window are in no checkpoint). The end-of-fit
    save of a run stopped by ``max_steps`` is written after its last step, before Lightning closes the epoch, so
    continuing it with a larger ``max_steps`` is exactly the longer run (a checkpoint written in ``on_train_end``
    records the epoch as finished and the continuation would start the next epoch's data order).

    The time decision is taken by rank 0 and agreed by all ranks (one boolean all-reduce per step under DDP), so
    every rank enters the checkpoint save together.

    Args:
        every_n_minutes: wall-clock interval; ``None`` or 0 disables the time trigger.
        every_n_steps: optimizer-step interval; ``None`` or 0 disables the step trigger.
        filename: file name inside the checkpoint folder.
    """

    def __init__(self, every_n_minutes: float | None = 15.0, every_n_steps: int | None = 1000,
                 filename: str = "last.ckpt") -> None:
        if every_n_minutes is not None and every_n_minutes < 0:
            raise ValueError(f"every_n_minutes must be >= 0 or None, got {every_n_minutes}")
        if every_n_steps is not None and every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 or None, got {every_n_steps}")
        if not filename.endswith(".ckpt") or "/" in filename:
            raise ValueError(f"filename must be a plain name ending in .ckpt, got {filename!r}")
        self.every_n_seconds = (every_n_minutes or 0) * 60.0
        self.every_n_steps = every_n_steps or 0
        self.filename = filename
        self._last_time = monotonic()
        self._last_step = 0
        self._step_at_batch_start = 0
        self.last_path: str | None = None

    @property
    def enabled(self) -> bool:
        return self.every_n_seconds > 0 or self.every_n_steps > 0

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_time, self._last_step = monotonic(), trainer.global_step

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stepped = trainer.global_step != self._step_at_batch_start  # False inside an accumulation window
        if not self.enabled or not stepped or trainer.global_step == self._last_step:
            return
        if 0 < trainer.max_steps <= trainer.global_step:  # the fit's last step: save before the epoch is closed
            self.save(trainer)
            return
        due = self.every_n_steps > 0 and trainer.global_step - self._last_step >= self.every_n_steps
        if not due and self.every_n_seconds > 0:
            late = trainer.is_global_zero and monotonic() - self._last_time >= self.every_n_seconds
            due = trainer.strategy.reduce_boolean_decision(late, all=False) if trainer.world_size > 1 else late
        if due:
            self.save(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A fit stopped otherwise (``max_epochs``, ``max_time``, early stopping) also leaves ``last.ckpt``, so
        ``--ckpt_path last`` and ``export`` find its final weights."""
        if self.enabled and trainer.global_step != self._last_step:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> str:
        """Write ``last.ckpt`` now (every rank must call this); returns its path."""
        path = str(checkpoint_dir(trainer) / self.filename)
        trainer.save_checkpoint(path, weights_only=False)  # full state; said, so Lightning does not note it
        self._last_time, self._last_step, self.last_path = monotonic(), trainer.global_step, path
        return path
