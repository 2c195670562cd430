"""Make a run resumed from a mid-epoch checkpoint continue exactly as the uninterrupted run would have."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class ExactResume(Callback):
    """Saves the global random states (``torch``, ``random``, ``numpy``, CUDA) with every checkpoint and restores
    them when training restarts, so dropout masks, rollout sampling, MAE masks and anything else drawn from them
    repeat exactly. Lightning does not do this itself. The data order is restored by the data modules' sampler
    (``datamodules.resumable_sampler``).

    A fit's validation runs on a fork of the random states: what it draws (MAE's masks, sampled generations) does
    not shift the training stream. So the training is the same whether a validation ran at that step or not, as
    for a run resumed from a save taken just before (or during) a validation, which does not repeat it.
    """

    def __init__(self) -> None:
        self._pending_rng: dict[str, Any] | None = None
        self._after_last_batch: dict[str, Any] | None = None  # the states when the last training batch ended
        self._validating = False
        self._before_validation: dict[str, Any] | None = None

    @staticmethod
    def _current() -> dict[str, Any]:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        # plain types only, so the checkpoint still loads with torch.load(weights_only=True)
        return {"torch": torch.get_rng_state(), "random": random.getstate(),
                "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def state_dict(self) -> dict[str, Any]:
        """The random states now; during a fit's validation (a preemption save), those of the last training
        batch's end, because the resumed run runs that validation again from its start."""
        if self._validating and self._after_last_batch is not None:
            return self._after_last_batch
        return self._current()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._after_last_batch = self._current()  # a few kB: what a save during the next validation records
        self._validating = False

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validating = True
            self._before_validation = self._current()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validating = False
        if self._before_validation is not None:  # training goes on from the states it left
            state, self._before_validation = self._before_validation, None
            self._apply(state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict  # applied when training restarts, after setup has drawn what it draws

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending_rng is None:
            return
        state, self._pending_rng = self._pending_rng, None
        self._apply(state)

    @staticmethod
    def _apply(state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["random"])
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
