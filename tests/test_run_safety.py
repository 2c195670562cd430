"""Run safety: NaN stop with intact checkpoints, log-dir checks, run info, determinism."""

import csv
import json
import math
from importlib import metadata

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.run.finite_loss import FiniteLossGuard, NonFiniteLossError
from datamodules.instruction import InstructionDataModule
from recipes.__main__ import main
from recipes.causal_lm import CausalLMModule
from recipes.cli import CONFIG_DIR
from recipes.parts.loggers import check_log_dir
from tests.conftest import SMOKE_ARGS
from tests.conftest import TINY_LM_CONFIG as TINY


class PoisonedAtStep(CausalLMModule):
    """Returns a NaN loss from optimizer step ``bad_step`` on."""

    def __init__(self, bad_step: int, **kwargs):
        super().__init__(**kwargs)
        self.bad_step = bad_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= self.bad_step else loss


def test_nan_loss_stops_with_step_and_last_metrics_and_keeps_last_good_checkpoint(tmp_path):
    data = InstructionDataModule(synthetic_dir=str(tmp_path / "syn"), synthetic_train_size=64, batch_size=4)
    module = PoisonedAtStep(bad_step=3, model_config=TINY, warmup_steps=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, callbacks=[FiniteLossGuard(), ckpt],
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(NonFiniteLossError, match=r"Training loss is nan at global step 4 .*\(step 3\): train/loss=\d"):
        trainer.fit(module, datamodule=data)
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "step=4" not in " ".join(saved) and any("step=3" in s for s in saved)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_unwritable_or_full_log_dir_fails_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=r"Log directory .*file/runs is not writable"):
        check_log_dir(blocker / "runs")
    with pytest.raises(OSError, match=r"MB free on the disk of log directory"):
        check_log_dir(tmp_path / "runs", min_free_mb=10**12)
    check_log_dir(tmp_path / "ok")


def _run_sft(root, seed: int):
    main(["fit", "--config", str(CONFIG_DIR / "sft.yaml"), f"--trainer.default_root_dir={root}", *SMOKE_ARGS,
          "--trainer.max_steps=3", "--trainer.limit_train_batches=3", f"--seed_everything={seed}",
          "--data.init_args.synthetic_train_size=64", "--data.init_args.batch_size=4"])
    return next(root.rglob("metrics.csv")).parent


def test_seed_and_versions_logged_and_runs_repeat_exactly(tmp_path, monkeypatch, cli_argv):
    monkeypatch.chdir(tmp_path)
    first, second = _run_sft(tmp_path / "a", 7), _run_sft(tmp_path / "b", 7)
    info = json.loads((first / "run_info.json").read_text())
    assert info["seed"] == 7
    assert info["torch"] == metadata.version("torch") and info["lightning"] == metadata.version("lightning")
    assert (first / "metrics.csv").read_text() == (second / "metrics.csv").read_text()
    other = _run_sft(tmp_path / "c", 8)
    assert (other / "metrics.csv").read_text() != (first / "metrics.csv").read_text()
    rows = list(csv.DictReader((first / "metrics.csv").open()))
    losses = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
