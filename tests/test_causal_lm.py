"""CausalLMModule: response-only loss, model loading, LoRA baseline, optimizer groups, schedule, logging."""

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import transformers
from lightning.pytorch.callbacks import LearningRateMonitor

from datamodules.instruction import InstructionDataModule
from datamodules.tokenizer import build_char_tokenizer
from recipes.causal_lm import CausalLMModule, LoraSettings
from recipes.parts.loggers import default_loggers
from recipes.parts.optim import decay_groups, warmup_cosine
from tests.conftest import TINY_LM_CONFIG as TINY


def _module(**kwargs) -> CausalLMModule:
    module = CausalLMModule(model_config=kwargs.pop("model_config", TINY), tokenizer_name="char", **kwargs)
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    dm = InstructionDataModule(synthetic_dir=str(tmp_path_factory.mktemp("syn")), synthetic_train_size=64,
                               batch_size=4)
    dm.prepare_data()
    dm.setup()
    return dm


def test_loss_counts_response_tokens_only(data):
    torch.manual_seed(0)
    module = _module()
    batch = next(iter(data.train_dataloader()))
    loss = module(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
    logits = module(batch["input_ids"], batch["attention_mask"]).logits
    # hand computation: next-token cross-entropy at the positions whose target is a response token
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    manual = F.cross_entropy(logits[:, :-1][keep], targets[keep])
    assert torch.allclose(loss, manual, atol=1e-6)
    # every kept target is a response character or the closing </s>, never prompt text
    tok = data.tokenizer
    for row, mask in zip(batch["input_ids"][:, 1:], keep, strict=True):
        text = tok.decode(row[mask])
        assert text.endswith("</s>") and text[:-4].isdigit()


def test_builds_from_a_pretrained_directory(tmp_path):
    tok = build_char_tokenizer()
    cfg = transformers.AutoConfig.for_model(**{**TINY, "vocab_size": len(tok)})
    reference = transformers.AutoModelForCausalLM.from_config(cfg)
    reference.save_pretrained(tmp_path / "model")
    module = CausalLMModule(model_path=str(tmp_path / "model"), tokenizer_name="char")
    module.configure_model()
    for (name, a), (_, b) in zip(reference.state_dict().items(), module.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="either model_path"):
        CausalLMModule(model_path="x", model_config=TINY)


def test_lora_trains_adapters_only():
    module = _module(lora=LoraSettings(r=2, alpha=4))
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = module.optimizer_factory(decay_groups(module.model))
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in module.model.parameters() if p.requires_grad}


def test_fit_moves_every_weight_and_names_lr_groups(data, tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=TINY, warmup_steps=2, exact_match_batches=1, max_new_tokens=4)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=default_loggers(tmp_path, "t", wandb="disabled"),
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=1,
                        val_check_interval=3, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[LearningRateMonitor(logging_interval="step")])
    trainer.validate(module, datamodule=data, verbose=False)  # builds the model
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer.fit(module, datamodule=data)
    moved = [n for n, p in module.model.named_parameters() if not torch.equal(before[n], p)]
    assert len(moved) == len(before)
    names = [g["name"] for g in trainer.optimizers[0].param_groups]
    assert names == ["decay", "no_decay"]
    assert trainer.optimizers[0].param_groups[1]["weight_decay"] == 0.0
    keys = set(trainer.logged_metrics)
    assert {"train/loss", "val/loss", "val/perplexity", "val/exact_match"} <= keys
    # LearningRateMonitor logs each named group: warm-up 1/2, 2/2, then cosine, times AdamW's default lr 1e-3
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    lrs = [(int(r["step"]), float(r["optim/lr/decay"]), float(r["optim/lr/no_decay"])) for r in rows
           if r.get("optim/lr/decay")]
    assert [(s, d) for s, d, _ in lrs] == [(s, pytest.approx(1e-3 * warmup_cosine(s, 2, 3))) for s in range(3)]
    assert all(d == n for _, d, n in lrs)
    assert math.isclose(float(trainer.logged_metrics["val/perplexity"]),
                        math.exp(float(trainer.logged_metrics["val/loss"])), rel_tol=1e-5)


def test_warmup_cosine_closed_form():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(110, 10, 110, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, min_ratio=0.1) == pytest.approx(0.1)


def test_each_run_gets_its_own_directory_and_wandb_inside_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = default_loggers(tmp_path, "sft", wandb="offline")
    second = default_loggers(tmp_path, "sft", wandb="offline")
    assert first[0].log_dir != second[0].log_dir
    assert first[1].save_dir == first[0].log_dir and second[1].save_dir == second[0].log_dir
    assert len(default_loggers(tmp_path, "sft", wandb="disabled")) == 1
    with pytest.raises(ValueError, match="wandb must be one of"):
        default_loggers(tmp_path, "sft", wandb="yes")
