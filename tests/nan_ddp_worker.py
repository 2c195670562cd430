"""Two-rank CPU DDP run where only rank 1 sees a NaN loss, from optimizer step 2 on; each rank writes what stopped it.

Run by tests/test_ddp_nan.py as ``python tests/nan_ddp_worker.py OUT_DIR`` (Lightning re-launches it per rank).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.demos.boring_classes import BoringModel  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from callbacks.finite_loss import FiniteLossGuard, NonFiniteLossError  # noqa: E402


class NaNOnRankOne(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and self.global_step >= 2:
            out["loss"] = out["loss"] * float("nan")
        return out


def main(out: Path) -> None:
    torch.set_num_threads(1)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", devices=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        callbacks=[FiniteLossGuard()], strategy=DDPStrategy(process_group_backend="gloo"))
    try:
        trainer.fit(NaNOnRankOne())
    except NonFiniteLossError as err:
        (out / f"rank{trainer.global_rank}.txt").write_text(str(err))
        sys.exit(3)
    (out / f"rank{trainer.global_rank}.txt").write_text(f"finished at step {trainer.global_step}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
