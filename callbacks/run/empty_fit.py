"""A fit that trained on nothing is an error, not a successful run."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class EmptyFitError(RuntimeError):
    """Raised when ``trainer.fit`` ends without having received a single training batch."""


def _describe(loader) -> str:
    dataset = getattr(loader, "dataset", None)
    parts = []
    try:
        parts.append(f"{len(dataset)} training samples")
    except TypeError:
        pass
    if getattr(loader, "batch_size", None) is not None:
        parts.append(f"batch_size={loader.batch_size}")
    if getattr(loader, "drop_last", False):
        parts.append("incomplete batches dropped")
    return ", ".join(parts)


class EmptyFitGuard(Callback):
    """Raise :class:`EmptyFitError` at the end of a fit whose training loop got no batch (empty data, a batch
    larger than the data with ``drop_last``, ``limit_train_batches=0``), naming the cause and what to change.
    A resumed run that had already reached ``max_steps``/``max_epochs`` is not an error.
    """

    def __init__(self) -> None:
        self._start_step = 0

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        if trainer.global_step > self._start_step or trainer.fast_dev_run:
            return
        if trainer.limit_train_batches == 0:
            raise EmptyFitError("fit trained on nothing: trainer.limit_train_batches is 0; raise it to train")
        if loop.max_batches != 0:  # already done (resumed at max_steps/max_epochs), or stopped on purpose
            return
        loaders = loop._combined_loader.flattened if loop._combined_loader is not None else []
        detail = "; ".join(d for d in map(_describe, loaders) if d)
        raise EmptyFitError(
            "fit got no training batch" + (f" ({detail})" if detail else "") + ": every epoch is empty, so nothing "
            "was trained. Lower the data's batch_size to at most the number of training samples per device, or "
            "give it more training data")
