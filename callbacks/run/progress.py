"""A progress bar for step-budgeted runs: the optimizer step and its budget next to the epoch."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from typing_extensions import override


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, described as ``Epoch 3 · step 120/2000`` when ``max_steps`` bounds the run.

    The plain bar prints ``Epoch 3/-2`` for ``max_epochs=-1``; here the epoch budget is shown only when it is
    one (``max_epochs >= 1``) and the step count is refreshed after every training batch. Also:

    - The total is in training batches, the unit the bar advances in: ``max_steps`` counts optimizer steps, and a
      batch makes ``updates_per_rollout`` of them (a module attribute; GRPO's ``mu * num_mini_batches``) or
      ``1 / accumulate_grad_batches``, so the remaining steps are converted to batches.
    - A run resumed mid-epoch starts at its restored batch position, so the total counts from the epoch start.
    - ``v_num`` is the run's version (``version_N`` -> ``N``), shown as it is, not as a float.
    """

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        text = f"Epoch {current_epoch}"
        if trainer.max_epochs is not None and trainer.max_epochs >= 1:
            text += f"/{trainer.max_epochs - 1}"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            text += f" · step {trainer.global_step}/{trainer.max_steps}"
        return f"{text:{len(self.validation_description)}}"

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id,
                                 description=self._get_train_description(trainer.current_epoch))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @property
    @override
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        total = trainer.num_training_batches
        if trainer.max_steps is None or trainer.max_steps < 0:
            return total
        steps_per_batch = getattr(trainer.lightning_module, "updates_per_rollout", 1) / trainer.accumulate_grad_batches
        remaining = math.ceil(max(0, trainer.max_steps - trainer.global_step) / steps_per_batch)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed  # > 0 only when resumed mid-epoch
        return min(total, done + remaining)

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv is not None and "v_num" in items:
            items["v_num"] = str(csv.version).removeprefix("version_")
        return items
