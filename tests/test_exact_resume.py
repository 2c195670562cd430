"""A run resumed from a mid-epoch checkpoint ends with the same weights and metrics as the uninterrupted run."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from callbacks.run.exact_resume import ExactResume
from datamodules.instruction import InstructionDataModule
from recipes.causal_lm import CausalLMModule
from tests.conftest import TINY_LM_CONFIG
from tests.probe_callbacks import CrashAtStep

TINY = {**TINY_LM_CONFIG, "attention_dropout": 0.1}  # dropout draws random numbers: resume must restore them


def _fit(root, max_steps, ckpt_path=None, every=None, crash_at=None, packing=False):
    L.seed_everything(3)
    data = InstructionDataModule(synthetic_dir=str(root.parent / "syn"), synthetic_train_size=40, batch_size=4,
                                 seed=1, packing=packing)
    module = CausalLMModule(model_config=TINY, warmup_steps=2, exact_match_batches=0)
    callbacks = [ExactResume()] + ([CrashAtStep(crash_at)] if crash_at else [])
    if every:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=CSVLogger(root, name="", version=""),
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        val_check_interval=4, limit_val_batches=2, log_every_n_steps=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    rows = list(csv.DictReader((root / "metrics.csv").open()))
    return module.model.state_dict(), rows


@pytest.mark.parametrize("packing", [False, True])
def test_resume_mid_epoch_matches_uninterrupted(tmp_path, packing):
    # 40 examples / batch 4 = 10 batches per epoch: step 5 is mid-epoch, 13 crosses into the second epoch
    # (packed: 40 examples in 14 rows of 64 tokens = 4 batches per epoch, step 13 is in the fourth epoch)
    steps = 13
    full_weights, full_rows = _fit(tmp_path / "full", steps, every=5, packing=packing)
    with pytest.raises(SystemError, match="simulated crash"):
        _fit(tmp_path / "cut", steps, every=5, crash_at=5, packing=packing)
    name = "epoch=1-step=5.ckpt" if packing else "epoch=0-step=5.ckpt"
    resumed_weights, resumed_rows = _fit(tmp_path / "resumed", steps, ckpt_path=tmp_path / "cut/ckpt" / name,
                                         packing=packing)
    for name, value in full_weights.items():
        assert torch.equal(value, resumed_weights[name]), name
    after = [r for r in full_rows if int(r["step"]) >= 5]
    assert after == [r for r in resumed_rows if int(r["step"]) >= 5]
    assert any(r.get("val/loss") for r in after)  # validation happened at the same steps
