"""Arguments are checked before they reach a library: each error names the argument, the value and what is
expected, and the CLI shows a class's own error instead of the parser's dump."""

import json
import math

import lightning as L
import pytest
import torch
import transformers

from callbacks.lisa import LISA
from callbacks.owlore import OwLore
from datamodules.instruction import InstructionDataModule
from datamodules.verifiable_qa import VerifiableQADataModule
from recipes.__main__ import main
from recipes.causal_lm import CausalLMModule
from recipes.cli import CONFIG_DIR
from recipes.grpo import GRPOModule
from recipes.mae_pretrain import MAEPretrainModule
from recipes.parts.mae_masking import random_masking
from tests.conftest import VOCAB, TinyModule, tiny_loader, trainer

TINY = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.mark.parametrize("weights,n_layers,match", [
    ([1.0, 0.0, 0.0, 0.0], 2, r"weights has 1 positive entries .* n_layers=2 .* at least 2 positive weights"),
    ([1.0, 1.0, 0.0, 0.0], 3, r"weights has 2 positive entries"),
    ([1.0, math.nan, 1.0], 1, r"weights must be finite and non-negative"),
    ([1.0, -1.0, 1.0], 1, r"weights must be finite and non-negative"),
])
def test_lisa_weights(weights, n_layers, match):
    with pytest.raises(ValueError, match=match):
        LISA(n_layers=n_layers, weights=weights)


def test_lisa_zero_weight_block_is_never_trained(tmp_path):
    lisa = LISA(n_layers=2, interval=1, weights=[1.0, 0.0, 1.0, 0.0])
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, *args):
            seen.append(list(lisa.active))

    trainer([lisa, Record()], 6, tmp_path).fit(TinyModule(), tiny_loader(batches=6))
    assert seen and all(active == [0, 2] for active in seen)


def test_mae_mask_ratio_that_masks_nothing():
    kwargs = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "decoder_dim": 16, "decoder_depth": 1,
              "decoder_heads": 2, "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\).*got 0.0"):
        MAEPretrainModule(mask_ratio=0.0, **kwargs)
    with pytest.raises(ValueError, match=r"mask_ratio=1e-17 removes 0 of the 16 patches"):
        MAEPretrainModule(mask_ratio=1e-17, **kwargs)
    module = MAEPretrainModule(mask_ratio=0.02, **kwargs)
    with pytest.raises(ValueError, match=r"mask_ratio=0.0 removes 0 of the 16 patches"):
        module(torch.randn(2, 1, 32, 32), mask_ratio=0.0)
    assert random_masking(torch.zeros(2, 16, 4), 0.0)[1].sum() == 0  # the encoder alone may see every patch
    loss = module(torch.randn(2, 1, 32, 32))[0]  # int(16 * 0.98) = 15 kept: one patch removed
    assert torch.isfinite(loss)


@pytest.mark.parametrize("scores,match", [
    ([1.0, -2.0, 1.0, 1.0], r"\(1, -2.0\)"), ([1.0, math.nan, 1.0, 1.0], r"\(1, nan\)"),
    ([1.0, 1.0, math.inf, 1.0], r"\(2, inf\)"),
])
def test_owlore_scores_file_and_scores_checked(tmp_path, scores, match):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"scores": scores}))
    owlore = OwLore(n_layers=2, scores_file=str(path), galore=False)
    with pytest.raises(ValueError, match=rf"scores_file {path}: outlier scores must be finite and non-negative.*"
                                         + match):
        trainer([owlore], 1, tmp_path).fit(TinyModule(), tiny_loader(batches=1))
    with pytest.raises(ValueError, match=r"scores: outlier scores must be finite and non-negative"):
        OwLore(n_layers=2, scores=scores)


class TinyGPT2(L.LightningModule):
    """GPT-2 blocks hold transformers' Conv1D layers, not nn.Linear."""

    def __init__(self):
        super().__init__()
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16)
        self.model = transformers.GPT2LMHeadModel(cfg)

    def forward(self, ids):
        return self.model(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_owlore_names_blocks_without_linear_layers(tmp_path):
    with pytest.raises(ValueError, match=r"block 0 \(model.transformer.h.0, GPT2Block\) has none: its weight layers "
                                         r"are \['Conv1D'\]"):
        trainer([OwLore(n_layers=1, galore=False)], 1, tmp_path).fit(TinyGPT2(), tiny_loader(batches=1))


def fit_one_step(tmp_path, module, data):
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path).fit(module, datamodule=data)


def test_max_length_beyond_the_models_positions(tmp_path):
    data = InstructionDataModule(synthetic_dir=str(tmp_path / "syn"), synthetic_train_size=16, batch_size=4,
                                 max_length=128)
    with pytest.raises(ValueError, match=r"data.max_length = 128: longer than the model's "
                                         r"max_position_embeddings=64 token positions; expected at most 64"):
        fit_one_step(tmp_path, CausalLMModule(model_config=TINY, exact_match_batches=0), data)
    gpt2 = {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 24}
    data = VerifiableQADataModule(synthetic_dir=str(tmp_path / "syn"), synthetic_sft_size=8, synthetic_train_size=8,
                                  synthetic_val_size=4, batch_size=2, sft_batch_size=4)
    with pytest.raises(ValueError, match=r"longest prompt \(\d+\) \+ max_new_tokens \(16\) = \d+: longer than the "
                                         r"model's max_position_embeddings=24"):
        fit_one_step(tmp_path, GRPOModule(model_config=gpt2, num_generations=2, max_new_tokens=16), data)


def test_data_module_sizes_are_checked():
    with pytest.raises(ValueError, match=r"batch_size must be >= 1 .* got batch_size=0"):
        InstructionDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"\{'sft_batch_size': 0\}: expected batch sizes and lengths >= 1"):
        VerifiableQADataModule(sft_batch_size=0)


def test_cli_shows_the_callbacks_own_error_first(tmp_path, capsys, monkeypatch, cli_argv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"weights has 1 positive entries") as info:
        main(["fit", "--config", str(CONFIG_DIR / "lisa_sft.yaml"), "--wandb=disabled",
              "--trainer.callbacks.init_args.weights=[1,0,0,0]"])
    assert info.value.__cause__ is None and info.value.__suppress_context__
    err = capsys.readouterr().err
    assert "Error in the run's configuration: ValueError: weights has 1 positive entries" in err
    assert "Does not validate against any of the Union subtypes" not in err
    assert not (tmp_path / "runs").exists()


def test_verifiable_batch_size_is_checked():
    with pytest.raises(ValueError, match=r"\{'batch_size': 0\}: expected batch sizes and lengths >= 1"):
        VerifiableQADataModule(batch_size=0)


def test_cli_shows_the_modules_own_error_first(tmp_path, capsys, monkeypatch, cli_argv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"num_generations \(G\) must"):
        main(["fit", "--config", str(CONFIG_DIR / "grpo_llds.yaml"), "--wandb=disabled",
              "--model.init_args.num_generations=1"])
    err = capsys.readouterr().err
    assert "Error in the run's configuration: ValueError: num_generations (G) must" in err
    assert "Union subtypes" not in err and not (tmp_path / "runs").exists()
