"""A callback for the multi-process tests: each rank writes what it trained and chose, to compare across ranks."""

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
        choices = {type(cb).__name__: _jsonable(cb.state_dict()) for cb in trainer.callbacks
                   if cb is not self and cb.state_dict()}
        choices.pop("ExactResume", None)  # global random states differ per rank (Lightning seeds each rank)
        out = {"rank": trainer.global_rank, "world": trainer.world_size, "step": trainer.global_step,
               "weights": weights, "callbacks": choices}
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(out, indent=1))


class PrintSteps(Callback):
    """Prints ``step N`` after every optimizer step (flushed), so a test can kill the process at a known step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        print(f"step {trainer.global_step}", flush=True)
