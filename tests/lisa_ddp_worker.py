"""LISA's two-rank DDP run on CPU, as a worker script (``python lisa_ddp_worker.py OUT``; see tests/test_lisa.py)."""

from __future__ import annotations

import sys

import lightning as L
import torch

from tests.conftest import TinyModule, tiny_loader, trainer


def _ddp_main(out_dir: str) -> None:
    """Two CPU ranks with different data: after training, every rank saves its weights and active history."""
    from callbacks.lisa import LISA

    torch.set_num_threads(1)

    class Recorder(L.Callback):
        def __init__(self):
            self.history, self.find_unused = [], None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.history.append(list(lisa.active))
            self.find_unused = trainer.strategy.model.find_unused_parameters  # the DDP wrapper's own setting

    lisa, rec = LISA(n_layers=1, interval=2, seed=3), Recorder()
    module = TinyModule()
    tr = trainer([lisa, rec], 6, out_dir, strategy="ddp", devices=2)  # plain DDP: LISA sets what it needs

    class RankData(L.LightningDataModule):
        def train_dataloader(self):
            return tiny_loader(batches=6, seed=10 + self.trainer.global_rank)

    tr.fit(module, datamodule=RankData())
    state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    torch.save({"weights": state, "history": rec.history, "find_unused": rec.find_unused},
               f"{out_dir}/rank{tr.global_rank}.pt")


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
