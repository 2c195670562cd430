"""``recipes.checkpoints``, the one reader of our Lightning checkpoints: it tells the module class from what the
checkpoint records, refuses one it cannot read or identify naming the file, and the resume rule takes the defining
settings from the classes."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.instruction import InstructionDataModule
from recipes.causal_lm import CausalLMModule
from recipes.checkpoints import (
    MODULE_CLASS_KEY,
    CheckpointError,
    load_module,
    module_class,
    record_module_class,
)
from recipes.mae_pretrain import MAEPretrainModule
from recipes.resume import check_resume, defining_settings
from recipes.vit_classifier import ViTClassifierModule
from tests.conftest import TINY_LM_CONFIG

ROOT = Path(__file__).resolve().parents[1]
# the only product files that call torch.load: our checkpoints, and the MAE encoder file (another format)
TORCH_LOADERS = {"recipes/checkpoints.py", "recipes/parts/vit_checkpoint.py"}


def test_only_the_checkpoint_reader_calls_torch_load():
    callers = set()
    for package in ("recipes", "callbacks", "datamodules"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "load" and getattr(node.value, "id", "") == "torch":
                    callers.add(str(path.relative_to(ROOT)))
    assert "recipes/checkpoints.py" in callers
    assert callers == TORCH_LOADERS


def _save(path: Path, **content) -> Path:
    torch.save({"state_dict": {}, **content}, path)
    return path


def test_the_class_comes_from_what_the_checkpoint_records(tmp_path):
    recorded = {}
    record_module_class(CausalLMModule(model_config=TINY_LM_CONFIG), recorded)
    assert recorded == {MODULE_CLASS_KEY: "recipes.causal_lm.CausalLMModule"}
    assert module_class(recorded, "a.ckpt") is CausalLMModule
    old = {"hyper_parameters": {"_class_path": "recipes.MAEPretrainModule"}}  # saved by python -m recipes before
    assert module_class(old, "b.ckpt") is MAEPretrainModule
    # a key that only one module writes says nothing: a checkpoint that records no class is refused
    with pytest.raises(CheckpointError, match=r"Checkpoint c.ckpt does not record its LightningModule class"):
        module_class({"label_names": ["a"], "grpo_sft_done": True}, "c.ckpt")
    with pytest.raises(CheckpointError, match=r"Checkpoint d.ckpt is of recipes.causal_lm.Gone, which cannot be"):
        module_class({MODULE_CLASS_KEY: "recipes.causal_lm.Gone"}, "d.ckpt")
    with pytest.raises(CheckpointError, match=r"Checkpoint e.ckpt records torch.nn.Linear, which is not a"):
        module_class({MODULE_CLASS_KEY: "torch.nn.Linear"}, "e.ckpt")


def test_each_module_records_its_class_when_saved(tmp_path):
    module = MAEPretrainModule(img_size=32, model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1,
                                                          "num_heads": 2}, decoder_dim=16, decoder_heads=2)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    trainer.strategy.connect(module)
    path = tmp_path / "mae.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_module(path, [MAEPretrainModule])
    assert type(loaded) is MAEPretrainModule and not loaded.training
    with pytest.raises(CheckpointError, match=rf"Checkpoint {path} is of recipes.mae_pretrain.MAEPretrainModule; "
                                              r"expected one of \['recipes.causal_lm.CausalLMModule'\]"):
        load_module(path, [CausalLMModule])


def test_unreadable_or_unidentified_files_are_named(tmp_path):
    broken = _save(tmp_path / "broken.ckpt", **{MODULE_CLASS_KEY: "recipes.causal_lm.CausalLMModule"})
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"Checkpoint {broken} \(100 bytes\) is truncated or corrupt"):
        load_module(broken)
    anonymous = _save(tmp_path / "anonymous.ckpt")
    with pytest.raises(CheckpointError, match=rf"Checkpoint {anonymous} does not record its LightningModule class"):
        load_module(anonymous)


def test_defining_settings_come_from_the_classes():
    assert defining_settings("recipes.CausalLMModule") == {"class_path", *CausalLMModule.defining_settings}
    assert "label_names" in defining_settings("recipes.vit_classifier.ViTClassifierModule", "no.such.Class")
    assert defining_settings("torch.nn.Linear") == {"class_path"}  # a class that declares none: its class only
    assert ViTClassifierModule.defining_settings >= {"init_from", "global_pool"}
    hparams = {"_class_path": "recipes.CausalLMModule", "model_config": TINY_LM_CONFIG}
    data_hparams = {"_class_path": "datamodules.instruction.InstructionDataModule", "tokenizer": "char",
                    "batch_size": 4}
    model = {"class_path": "recipes.CausalLMModule", "init_args": {"model_config": TINY_LM_CONFIG}}
    data = {"class_path": "datamodules.instruction.InstructionDataModule",
            "init_args": {"tokenizer": "hf/tok", "batch_size": 8}}
    assert InstructionDataModule.defining_settings == {"tokenizer"}
    with pytest.raises(CheckpointError, match=r"data.tokenizer: checkpoint 'char', now 'hf/tok'") as info:
        check_resume({"hyper_parameters": hparams, "datamodule_hyper_parameters": data_hparams}, "x.ckpt", model,
                     data)
    assert "batch_size" not in str(info.value)
