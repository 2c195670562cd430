"""The console progress bar: its total counts training batches, like its position, also for GRPO and resumed runs."""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from typing_extensions import override

from callbacks.progress import StepProgressBar


class RecipesProgressBar(StepProgressBar):
    """The step-budget bar, with these corrections.

    - The total is in training batches, the unit the bar advances in: ``trainer.max_steps`` counts optimizer
      steps, and a batch makes ``updates_per_rollout`` of them in GRPO and ``1 / accumulate_grad_batches`` in
      general, so the remaining steps are converted to batches.
    - A run resumed mid-epoch starts at its restored batch position, so the total counts from the epoch start.
    - ``v_num`` is the run's version (``version_N`` -> ``N``), shown as it is, not as a float.
    """

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
