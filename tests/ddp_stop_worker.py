"""Two-rank CPU DDP run where only rank 1 sees the reason to stop, from optimizer step 2 on: a NaN loss (``nan``)
or a SIGTERM (``sigterm``). Each rank writes what stopped it.

Run by tests/test_ddp_stop.py as ``python tests/ddp_stop_worker.py OUT_DIR MODE`` (Lightning re-launches it per
rank).
"""

import atexit
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.demos.boring_classes import BoringModel  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from callbacks.run.finite_loss import FiniteLossGuard, NonFiniteLossError  # noqa: E402
from callbacks.run.preemption import Preempted, PreemptionCheckpoint  # noqa: E402


class TroubleOnRankOne(BoringModel):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == 2 and self.mode == "sigterm":
            signal.raise_signal(signal.SIGTERM)
        out = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and self.global_step >= 2 and self.mode == "nan":
            out["loss"] = out["loss"] * float("nan")
        return out


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    # runs after every exit handler registered later (atexit is last in, first out): was the group released?
    atexit.register(lambda: (out / f"pg_at_exit_{os.getpid()}.txt").write_text(
        "initialized" if torch.distributed.is_initialized() else "released"))
    trainer = L.Trainer(max_steps=8, accelerator="cpu", devices=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        callbacks=[FiniteLossGuard(), PreemptionCheckpoint()], default_root_dir=out,
                        strategy=DDPStrategy(process_group_backend="gloo"))
    try:
        trainer.fit(TroubleOnRankOne(mode))
    except NonFiniteLossError as err:
        (out / f"rank{trainer.global_rank}.txt").write_text(str(err))
        sys.exit(3)
    except Preempted as err:
        (out / f"rank{trainer.global_rank}.txt").write_text(str(err))
        raise
    (out / f"rank{trainer.global_rank}.txt").write_text(f"finished at step {trainer.global_step}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
