"""Two-rank CPU DDP run with ProgressiveLayerDrop; each rank saves its drop masks and final weights.

Run by tests/test_layer_drop.py as ``python tests/pld_ddp_worker.py OUT_DIR`` (Lightning re-launches it per rank).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from callbacks import ProgressiveLayerDrop  # noqa: E402
from tests.conftest import VOCAB, TinyModule  # noqa: E402


class Recorder(L.Callback):
    def __init__(self, pld: ProgressiveLayerDrop):
        self.pld, self.masks, self.find_unused = pld, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # runs after the callback drew
        self.masks.append(list(self.pld.keep))
        self.find_unused = trainer.strategy.model.find_unused_parameters  # the DDP wrapper's own setting


def main(out: Path) -> None:
    torch.set_num_threads(1)
    pld = ProgressiveLayerDrop(theta_bar=0.3, gamma=1.0, seed=11)
    recorder = Recorder(pld)
    ids = torch.randint(0, VOCAB, (24, 8), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[pld, recorder],
                        strategy=DDPStrategy(process_group_backend="gloo"))  # plain DDP: the callback adjusts it
    module = TinyModule(optimizer_cls=torch.optim.SGD, lr=0.1)
    trainer.fit(module, loader)
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    torch.save({"masks": recorder.masks, "weights": weights, "find_unused": recorder.find_unused},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
