"""A run whose trainable modules are in eval mode at the first training step stops (or warns loudly) before it
trains: such a model trains without its dropout and without gradient checkpointing, and nothing else shows it."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from callbacks.core.modes import trainable_in_eval

ACTIONS = ("error", "warn")


class TrainModeError(RuntimeError):
    """Raised at the start of training when trainable modules are in eval mode."""


class TrainModeCheck(Callback):
    """At the start of training (after the sanity check, before the first step), find the modules in eval mode that
    hold trainable parameters, or the parameter-free modules (dropout) directly inside one
    (:func:`callbacks.core.modes.trainable_in_eval`), and stop with :class:`TrainModeError` naming them, or warn.

    The usual cause is a model loaded with ``from_pretrained`` (which returns eval mode) and never put into train
    mode: Lightning keeps the modes it finds. Call ``model.train()`` after loading (the recipes do), or freeze the
    part that is meant to stay in eval mode (``requires_grad_(False)``).

    Args:
        action: ``"error"`` (default) stops the run; ``"warn"`` warns and trains anyway.
    """

    def __init__(self, action: str = "error") -> None:
        if action not in ACTIONS:
            raise ValueError(f"TrainModeCheck action must be one of {ACTIONS}, got {action!r}")
        self.action = action

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        found = trainable_in_eval(pl_module)
        if not found:
            return
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        message = (f"{len(found)} trainable module(s) are in eval mode at the start of training ({shown}): they would "
                   "train without dropout and without gradient checkpointing. A model from from_pretrained() comes in "
                   "eval mode and Lightning keeps modes: call .train() on it after loading (in configure_model), or "
                   "freeze (requires_grad_(False)) what is meant to stay in eval mode")
        if self.action == "error":
            raise TrainModeError(message)
        rank_zero_warn(message)
