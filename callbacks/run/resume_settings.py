"""On resume, the optimizer settings given now win over the ones stored in the checkpoint."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

_RUNTIME = ("params", "lr")  # the parameters themselves, and the current (scheduled) learning rate


class OptimizerSettingsOnResume(Callback):
    """Restoring a checkpoint puts back the optimizer's param-group settings (peak ``lr``/``initial_lr``,
    ``weight_decay``, ``betas``, ...) and the schedulers' ``base_lrs`` as they were when it was saved, so a new
    learning rate or weight decay given on resume would be silently ignored. This callback records the values the
    run was configured with (``on_fit_start``, before the restore) and puts them back after the restore
    (``on_train_start``), keeping the restored moments and step counts. For ``LambdaLR``-style schedulers the
    current learning rate is recomputed from the new base value at the restored step. The changed values are
    listed in one message.
    """

    def __init__(self) -> None:
        self._fresh: list[list[dict[str, Any]]] = []
        self._base_lrs: list[list[float] | None] = []

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fresh = [[{k: v for k, v in g.items() if k not in _RUNTIME} for g in opt.param_groups]
                       for opt in trainer.optimizers]
        self._base_lrs = [list(getattr(c.scheduler, "base_lrs", [])) or None for c in trainer.lr_scheduler_configs]

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.ckpt_path or len(self._fresh) != len(trainer.optimizers):
            return
        changed = []
        for i, (opt, fresh) in enumerate(zip(trainer.optimizers, self._fresh, strict=True)):
            if len(fresh) != len(opt.param_groups):
                continue
            for j, (group, want) in enumerate(zip(opt.param_groups, fresh, strict=True)):
                for key, value in want.items():
                    if key in group and group[key] != value:
                        changed.append(f"optimizer {i} group {j} {key}: checkpoint {group[key]!r}, now {value!r}")
                        group[key] = value
        for config, base in zip(trainer.lr_scheduler_configs, self._base_lrs, strict=False):
            scheduler = config.scheduler
            if base is None or list(scheduler.base_lrs) == base:
                continue
            scheduler.base_lrs = list(base)
            lambdas = getattr(scheduler, "lr_lambdas", None)
            if lambdas is not None:
                for group, lr, fn in zip(scheduler.optimizer.param_groups, base, lambdas, strict=True):
                    group["lr"] = lr * fn(scheduler.last_epoch)
        if changed:
            rank_zero_info("Optimizer settings changed since the checkpoint (the values given now are used):\n  "
                           + "\n  ".join(changed))
