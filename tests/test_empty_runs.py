"""A run that did nothing does not look successful: no training batch, untrained evaluation, NaN in warm-up."""

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

from callbacks.run.empty_fit import EmptyFitError, EmptyFitGuard
from callbacks.run.finite_loss import NonFiniteLossError
from datamodules.jsonl_records import DataError
from datamodules.verifiable_qa import VerifiableQADataModule
from recipes.__main__ import main
from recipes.cli import CONFIG_DIR
from recipes.grpo import GRPOModule
from tests.conftest import TINY_LM_CONFIG as TINY


class TinyData(BoringModel):
    def __init__(self, n: int, batch_size: int):
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self):
        return DataLoader(RandomDataset(32, self.n), batch_size=self.batch_size, drop_last=True)


def _trainer(tmp_path, **kwargs):
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, callbacks=[EmptyFitGuard()], default_root_dir=tmp_path,
                     **{"max_steps": 2, **kwargs})


def test_fit_without_a_training_batch_is_an_error_naming_the_cause(tmp_path):
    with pytest.raises(EmptyFitError, match=r"no training batch \(3 training samples, batch_size=4, incomplete "
                                            r"batches dropped\).*Lower the data's batch_size"):
        _trainer(tmp_path).fit(TinyData(3, 4))
    with pytest.raises(EmptyFitError, match="limit_train_batches is 0"):
        _trainer(tmp_path, limit_train_batches=0).fit(TinyData(8, 4))


def test_resuming_a_finished_run_is_not_an_empty_fit(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit(TinyData(8, 4))
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    again = _trainer(tmp_path)
    again.fit(TinyData(8, 4), ckpt_path=tmp_path / "done.ckpt")
    assert again.global_step == 2


def test_grpo_with_more_prompts_per_batch_than_data_stops_at_setup(tmp_path):
    dm = VerifiableQADataModule(synthetic_dir=str(tmp_path / "syn"), synthetic_sft_size=32, synthetic_train_size=6,
                                synthetic_val_size=4, batch_size=8, sft_batch_size=8)
    dm.prepare_data()
    with pytest.raises(DataError, match=r"train.jsonl: 6 train samples make no complete batch of "
                                        r"data.batch_size=8 .*lower data.batch_size to at most 6"):
        dm.setup("fit")


def test_nan_during_grpo_sft_warmup_stops_with_the_step(tmp_path):
    dm = VerifiableQADataModule(synthetic_dir=str(tmp_path / "syn"), synthetic_sft_size=32, synthetic_train_size=16,
                                synthetic_val_size=4, batch_size=2, sft_batch_size=8)
    module = GRPOModule(model_config=TINY, num_generations=2, max_new_tokens=4, sft_steps=3)
    module.tokenizer = dm.tokenizer
    module.configure_model()
    with torch.no_grad():
        module.model.get_input_embeddings().weight.fill_(float("nan"))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(NonFiniteLossError, match=r"SFT warm-up loss is nan at warm-up step 1/3"):
        trainer.fit(module, datamodule=dm)


def test_evaluating_an_untrained_model_warns_and_marks_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--config", str(CONFIG_DIR / "sft.yaml"), "--trainer.default_root_dir=runs", "--wandb=disabled",
            "--trainer.accelerator=cpu", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--data.init_args.synthetic_train_size=40", "--data.init_args.synthetic_dir=syn",
            "--model.init_args.model_config.hidden_size=16", "--model.init_args.model_config.intermediate_size=32",
            "--model.init_args.exact_match_batches=0"]
    with pytest.warns(UserWarning, match="UNTRAINED MODEL: no --ckpt_path and no pretrained weights") as record:
        main(args)
    assert sum("UNTRAINED MODEL" in str(w.message) for w in record) == 2  # before and after the results
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["sft-untrained"]
