"""GRPO's start from an SFT checkpoint: one method reads it; resuming, validating and loading a GRPO checkpoint never
need it again; the supervised warm-up runs once per run."""

import lightning as L
import pytest
import torch

import recipes.grpo.module as grpo_module
from recipes.checkpoints import CheckpointError
from recipes.grpo import GRPOModule
from tests.conftest import TINY_LM_CONFIG as TINY
from tests.conftest import grpo_data as data
from tests.conftest import write_sft_checkpoint


def _trainer(root, steps, **kwargs):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                     **kwargs)


def _grpo(sft_path, **kwargs):
    return GRPOModule(sft_checkpoint=str(sft_path), num_generations=2, max_new_tokens=4,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.0), **kwargs)


class WeightsAtFitStart(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def test_fit_starts_from_the_sft_weights_and_resumes_without_the_file(tmp_path, monkeypatch):
    sft_path, sft_state = write_sft_checkpoint(tmp_path)
    warmups = []
    real_warmup = grpo_module.sft_warmup
    monkeypatch.setattr(grpo_module, "sft_warmup", lambda *a, **k: warmups.append(1) or real_warmup(*a, **k))
    seen = WeightsAtFitStart()
    m = _grpo(sft_path, sft_steps=1, sft_lr=0.0)
    trainer = _trainer(tmp_path, 1, callbacks=[seen])
    trainer.fit(m, datamodule=data(tmp_path))
    assert m.architecture[1] == TINY and m.hparams.model_config is None  # the SFT file's, the settings untouched
    for name, value in sft_state.items():  # the SFT weights are in place before any callback's fit start
        assert torch.equal(seen.state[name], value), name
    assert m._sft_data_hparams["synthetic_format"] == "gsm8k" and warmups == [1]
    ckpt = tmp_path / "grpo.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["grpo_sft_done"] is True

    sft_path.unlink()  # resuming and loading need only the GRPO checkpoint
    resumed = _grpo(sft_path, sft_steps=1, sft_lr=0.0)
    _trainer(tmp_path, 2).fit(resumed, datamodule=data(tmp_path), ckpt_path=ckpt)
    assert warmups == [1]  # the warm-up ran once in the run
    loaded = GRPOModule.load_from_checkpoint(ckpt, map_location="cpu")
    for name, value in sft_state.items():
        assert torch.equal(loaded.model.state_dict()[name], value), name


def test_a_missing_sft_checkpoint_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "gone.ckpt"
    with pytest.raises(CheckpointError, match="gone.ckpt"):
        _trainer(tmp_path, 1).fit(_grpo(missing), datamodule=data(tmp_path))
    m = _grpo(missing, tokenizer_name="char")
    with pytest.raises(CheckpointError, match="sft_checkpoint.*gone.ckpt does not exist"):
        m.configure_model()

