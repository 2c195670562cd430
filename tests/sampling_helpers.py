"""A Lightning trainer for the LISA / OwLore tests, and their two-rank DDP run (``python sampling_helpers.py OUT``)."""

from __future__ import annotations

import sys

import lightning as L
import torch

from tests.conftest import TinyModule, tiny_loader


def trainer(callbacks: list, max_steps: int, root, **kwargs) -> L.Trainer:
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=root, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     log_every_n_steps=1, **kwargs)


def _ddp_main(out_dir: str) -> None:
    """Two CPU ranks with different data: after training, every rank saves its weights and active history."""
    from callbacks.lisa import LISA

    torch.set_num_threads(1)

    class Recorder(L.Callback):
        def __init__(self):
            self.history = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.history.append(list(lisa.active))

    lisa, rec = LISA(n_layers=1, interval=2, seed=3), Recorder()
    module = TinyModule()
    tr = trainer([lisa, rec], 6, out_dir, strategy="ddp_find_unused_parameters_true", devices=2)

    class RankData(L.LightningDataModule):
        def train_dataloader(self):
            return tiny_loader(batches=6, seed=10 + self.trainer.global_rank)

    tr.fit(module, datamodule=RankData())
    state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    torch.save({"weights": state, "history": rec.history}, f"{out_dir}/rank{tr.global_rank}.pt")


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
