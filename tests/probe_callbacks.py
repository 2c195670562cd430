"""Callbacks the multi-process, kill and resume tests add to recipe runs from the command line."""

import atexit
import hashlib
import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


class RankStateDump(Callback):
    """At the end of fit, write ``rank<N>.json``: a hash of every parameter and every stateful callback's state."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module) -> None:
        weights = {name: _jsonable(p) for name, p in pl_module.named_parameters()}
        # ExactResume holds the global random states, which differ per rank (Lightning seeds each rank);
        # ModelCheckpoint holds file paths and RunConfigSaver the run's config (its folders, --ckpt_path), which
        # differ per run
        skip = (
            self,
            *trainer.checkpoint_callbacks,
            *[cb for cb in trainer.callbacks if type(cb).__name__ in ("ExactResume", "RunConfigSaver")],
        )
        choices = {
            type(cb).__name__: _jsonable(cb.state_dict())
            for cb in trainer.callbacks
            if cb not in skip and cb.state_dict()
        }
        out = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "step": trainer.global_step,
            "weights": weights,
            "callbacks": choices,
        }
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(out, indent=1))
        if trainer.world_size > 1:  # at the process's exit: is the group still up (gloo's threads can abort it)?
            pg_file = Path(self.out_dir) / f"rank{trainer.global_rank}_pg_at_exit.txt"
            atexit.register(lambda: pg_file.write_text(
                "initialized" if torch.distributed.is_initialized() else "released"))


class PrintSteps(Callback):
    """Prints ``step N`` after every optimizer step (flushed), so a test can kill the process at a known step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        print(f"step {trainer.global_step}", flush=True)


class CrashAtStep(Callback):
    """Simulates the process dying right after the checkpoint of optimizer step ``step`` was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SystemError(f"simulated crash at step {self.step}")

