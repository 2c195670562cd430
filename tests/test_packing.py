"""Packing (``data.packing: true``): every example's loss equals its unpacked loss, attention never crosses
examples, LISA and layer drop train on packed rows, the padding share is logged."""

import csv

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from callbacks.core.layer_stats import forward_batch, token_mask
from callbacks.layer_diagnostics import LayerDiagnostics
from callbacks.layer_drop import ProgressiveLayerDrop
from callbacks.lisa import LISA
from datamodules.chat_encoding import IGNORE_INDEX, collate_examples
from datamodules.instruction import InstructionDataModule
from datamodules.packing import PackedDataset, collate_packed, pack_rows
from recipes.causal_lm import CausalLMModule
from tests.conftest import TINY_LM_CONFIG

LONG = {**TINY_LM_CONFIG, "max_position_embeddings": 128}
FAMILIES = {"llama": LONG, "qwen2": {**LONG, "model_type": "qwen2"}}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    dm = InstructionDataModule(synthetic_dir=str(tmp_path_factory.mktemp("syn")), synthetic_train_size=48,
                               batch_size=3, max_length=96, packing=True)
    dm.prepare_data()
    dm.setup()
    return dm


def test_rows_hold_every_example_once_within_max_length():
    lengths = [5, 9, 3, 10, 1, 7, 7, 2, 10]
    rows = pack_rows(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 6  # first-fit decreasing: 10 | 10 | 9+1 | 7+3 | 7+2 | 5
    assert pack_rows(lengths, 10) == rows  # deterministic
    with pytest.raises(ValueError, match="example 1 has 11 tokens; packing needs 1 to max_length=10"):
        pack_rows([3, 11], 10)


def test_rows_restart_positions_and_mask_the_first_label(packed):
    ds: PackedDataset = packed.datasets["train"]
    assert len(ds) < len(ds.dataset) and max(len(r) for r in ds.rows) > 1
    row = ds[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) == len(ds.rows[0]) and len(row["input_ids"]) <= 96
    assert all(row["labels"][s] == IGNORE_INDEX for s in starts)
    ends = starts[1:] + [len(row["input_ids"])]
    for s, e, i in zip(starts, ends, ds.rows[0], strict=True):
        assert row["input_ids"][s:e] == ds.dataset[i]["input_ids"]
        assert row["labels"][s + 1:e] == ds.dataset[i]["labels"][1:]


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at each position (0 where the target is ignored)."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none",
                           ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("chunk", [None, 16])
def test_each_example_loss_equals_its_unpacked_loss(packed, family, chunk):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=FAMILIES[family], tokenizer_name="char", loss_chunk_size=chunk)
    module.configure_model()
    module.eval()
    ds: PackedDataset = packed.datasets["train"]
    batch = collate_packed([ds[r] for r in range(3)], packed.tokenizer.pad_token_id)
    with torch.no_grad():
        packed_losses = _token_losses(module.model(input_ids=batch["input_ids"],
                                                   position_ids=batch["position_ids"], use_cache=False).logits,
                                      batch["labels"])
        for r in range(3):
            start = 0
            for i in ds.rows[r]:
                example = collate_examples([ds.dataset[i]], packed.tokenizer.pad_token_id)
                alone = _token_losses(module(example["input_ids"], example["attention_mask"]).logits,
                                      example["labels"])[0]
                n = example["input_ids"].shape[1]
                torch.testing.assert_close(packed_losses[r, start:start + n - 1], alone, atol=1e-5, rtol=0)
                start += n
        # the module's loss of the packed batch: the token-weighted mean, also laid out as one row (flash)
        weighted = packed_losses.sum() / (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        torch.testing.assert_close(module.lm_loss(batch), weighted, atol=1e-5, rtol=0)
        one_row = {k: v.reshape(1, -1) for k, v in batch.items() if k != "num_tokens"}
        torch.testing.assert_close(module.lm_loss(one_row), weighted, atol=1e-5, rtol=0)


def test_measurements_keep_attention_inside_examples(packed):
    """LISA importance, OwLore calibration and layer diagnostics run the model on training batches: a packed one
    runs as in training, its padding left out of the means."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=LONG, tokenizer_name="char")
    module.configure_model()
    module.eval()
    ds: PackedDataset = packed.datasets["train"]
    batch = collate_packed([ds[0], ds[len(ds) - 1]], packed.tokenizer.pad_token_id)
    with torch.no_grad():
        trained = module.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        torch.testing.assert_close(forward_batch(module, batch).logits, trained.logits, atol=0, rtol=0)
    mask = token_mask(batch)
    assert mask.sum(1).tolist() == batch["num_tokens"].tolist() and mask[:, 0].all()


def _fit(root, packing: bool, callbacks: list) -> list[dict]:
    L.seed_everything(0)
    data = InstructionDataModule(synthetic_dir=str(root.parent / "syn"), synthetic_train_size=48, batch_size=4,
                                 packing=packing)
    module = CausalLMModule(model_config={**TINY_LM_CONFIG, "num_hidden_layers": 3}, warmup_steps=0,
                            exact_match_batches=0)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=CSVLogger(root, name="", version=""),
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    return list(csv.DictReader((root / "metrics.csv").open()))


def test_lisa_and_layer_drop_train_on_packed_rows_with_less_padding(tmp_path):
    callbacks = [LISA(n_layers=1, interval=2, seed=0, sampling="importance"),
                 ProgressiveLayerDrop(theta_bar=0.5, gamma=1.0, seed=0),
                 LayerDiagnostics(interval=2, probe_size=2, heatmaps=False, logit_lens=True)]
    packed_log = _fit(tmp_path / "packed", True, callbacks)
    packed_rows = [r for r in packed_log if r.get("train/loss")]
    padded_rows = [r for r in _fit(tmp_path / "padded", False, []) if r.get("train/loss")]
    assert len(packed_rows) == 4 and all(torch.isfinite(torch.tensor(float(r["train/loss"]))) for r in packed_rows)
    packed_padding = [float(r["data/padding_fraction"]) for r in packed_rows]
    padded_padding = [float(r["data/padding_fraction"]) for r in padded_rows]
    assert all(0.0 <= p < 0.2 for p in packed_padding), packed_padding
    assert sum(packed_padding) < sum(padded_padding)
    assert any(r.get("layers/block_influence/0") for r in packed_log)
