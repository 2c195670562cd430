"""Stop training at the first non-finite loss, naming the step and the last finite metrics."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite."""


class FiniteLossGuard(Callback):
    """Raise :class:`NonFiniteLossError` as soon as the training loss is NaN/inf.

    The error is raised in ``on_train_batch_end``, before any checkpoint callback runs for that step (Lightning
    runs checkpoint callbacks last), so the last good checkpoint is never replaced by one with broken weights.
    Works for automatic optimization (the step's returned loss) and manual optimization (the logged
    ``train/loss``). Under DDP the ranks agree on the decision (one boolean all-reduce per step, as Lightning's
    ``EarlyStopping`` does), so a NaN seen by one rank stops every rank at the same step instead of leaving the
    others blocked in the next collective.

    Cost: one device-to-host read of the scalar loss per step (the check needs its value before the checkpoint
    callbacks run), plus the boolean all-reduce under DDP. Other ``train/*`` metrics are kept as tensor references
    and read only for the error message.
    """

    def __init__(self, metric: str = "train/loss") -> None:
        self.metric = metric
        self.last_finite: dict[str, torch.Tensor] = {}
        self.last_finite_step: int | None = None

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            loss = trainer.callback_metrics.get(self.metric)
        value = None if loss is None else float(loss.detach() if isinstance(loss, torch.Tensor) else loss)  # host read
        bad = value is not None and not math.isfinite(value)
        if trainer.world_size > 1:
            bad_anywhere = trainer.strategy.reduce_boolean_decision(bad, all=False)
        else:
            bad_anywhere = bad
        if bad_anywhere:
            last = ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(self.last_finite.items())) or "none logged yet"
            where = (f"Training loss is {value}" if bad
                     else f"Training loss is non-finite on another rank (here {value})")
            raise NonFiniteLossError(
                f"{where} at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                f"batch {batch_idx}, rank {trainer.global_rank}). Last finite metrics (step {self.last_finite_step}): "
                f"{last}. Checkpoints written before this step are intact; lower the learning rate or check the data."
            )
        if value is None:
            return
        # references only: converted to numbers when an error is reported
        self.last_finite = {k: v for k, v in trainer.callback_metrics.items()
                            if k.startswith("train/") and v.numel() == 1}
        self.last_finite_step = trainer.global_step
