"""``python -m recipes export``: checkpoints become Hugging Face / timm folders that load elsewhere with the same
outputs, and every module's ``load_from_checkpoint`` needs no extra arguments."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
import timm
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes import CausalLMModule, GRPOModule, MAEPretrainModule, ViTClassifierModule
from recipes.__main__ import main
from recipes.cli import CONFIG_DIR

IDS = torch.tensor([[1, 10, 20, 30, 40, 50], [1, 11, 21, 31, 41, 51]])


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    run = run_recipe("fit", "sft", root, "--model.init_args.lora", "{r: 4, alpha: 8}")
    return last_checkpoint(run)


def test_lora_checkpoint_exports_merged_with_the_same_logits(lora_ckpt, tmp_path):
    module = CausalLMModule.load_from_checkpoint(lora_ckpt, map_location="cpu").eval()
    assert isinstance(module.model, PeftModel) and module.lora.r == 4
    # the adapters trained: B is no longer all zero, so merging changes the weights
    assert any(p.abs().sum() > 0 for n, p in module.model.named_parameters() if "lora_B" in n)
    main(["export", "--ckpt_path", str(lora_ckpt), "--out", str(tmp_path / "hf")])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert not any("lora" in n for n, _ in exported.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(exported(IDS).logits, module(IDS).logits, rtol=1e-4, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Add: 2+3"}], tokenize=False,
                                         add_generation_prompt=True)
    assert tokenizer(text)["input_ids"] == module.tokenizer(text)["input_ids"]


def test_keep_adapters_writes_peft_adapters_and_base(lora_ckpt, tmp_path):
    module = CausalLMModule.load_from_checkpoint(lora_ckpt, map_location="cpu").eval()
    main(["export", "--ckpt_path", str(lora_ckpt), "--out", str(tmp_path / "hf"), "--keep_adapters"])
    assert (tmp_path / "hf" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "base", local_files_only=True)
    assert not any("lora" in n for n, _ in base.named_parameters())
    peft_model = PeftModel.from_pretrained(base, tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, module(IDS).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*AUROC undefined")  # a few phantom images: some labels have no positive
def test_vit_and_mae_checkpoints_export_to_timm_and_test_beside_the_run(tmp_path, caplog):
    mae_run = run_recipe("fit", "mae_pretrain_cxr", tmp_path)
    mae = MAEPretrainModule.load_from_checkpoint(last_checkpoint(mae_run), map_location="cpu").eval()
    main(["export", "--ckpt_path", str(last_checkpoint(mae_run)), "--out", str(tmp_path / "mae_timm")])
    assert "does not match 1 channels" not in caplog.text  # timm's note on 3-channel statistics: written for 1
    encoder = timm.create_model(f"local-dir:{tmp_path / 'mae_timm'}", pretrained=True).eval()
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), mae.encoder(images))

    vit_run = run_recipe("fit", "vit_finetune_cxr", tmp_path, "--model.init_args.init_from",
                         str(mae_run / "encoder.pth"))
    ckpt = last_checkpoint(vit_run)
    vit = ViTClassifierModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "vit_timm")])
    encoder_path = str(mae_run / "encoder.pth")
    shutil.rmtree(mae_run)  # the classifier checkpoint holds its weights: the MAE files are not needed any more
    # `test` of the checkpoint, with the config that trained it, writes beside the training run
    run_recipe("test", "vit_finetune_cxr", tmp_path, "--model.init_args.init_from", encoder_path, "--ckpt_path",
               str(ckpt))
    eval_dir = vit_run / "eval" / "test_0"
    assert (eval_dir / "test_auroc.csv").is_file() and (eval_dir / "test_auroc.png").is_file()
    assert "test/auroc_macro" in (eval_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    classifier = timm.create_model(f"local-dir:{tmp_path / 'vit_timm'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), vit(images))
    assert classifier.pretrained_cfg["label_names"] == vit.label_names
    # a plain state_dict load into the same architecture works as well
    plain = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=14, img_size=64, in_chans=1,
                              global_pool="avg", patch_size=8, embed_dim=96, depth=4, num_heads=3)
    plain.load_state_dict(classifier.state_dict())


def test_grpo_checkpoint_loads_and_exports_without_the_sft_file(tmp_path):
    sft_ckpt = last_checkpoint(run_recipe("fit", "sft", tmp_path / "a", "--data.init_args.synthetic_format",
                                          "gsm8k"))
    moved = tmp_path / "sft.ckpt"
    shutil.copy(sft_ckpt, moved)
    run = run_recipe("fit", "grpo_llds", tmp_path / "b", "--model.init_args.sft_steps", "0",
                     "--model.init_args.model_config", "null", "--model.init_args.sft_checkpoint", str(moved),
                     "--trainer.max_steps", "4")
    ckpt = last_checkpoint(run)
    moved.unlink()
    module = GRPOModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "hf")])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(IDS).logits, module.model(IDS).logits)


# Short runs of the shipped recipes through ``python -m recipes`` (in-process)

QUICK = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
         "--trainer.log_every_n_steps", "1", "--wandb", "disabled"]
SHORT_DATA = {
    "sft": ["--data.init_args.synthetic_train_size", "100", "--trainer.val_check_interval", "2"],
    "grpo_llds": ["--model.init_args.sft_steps", "2", "--data.init_args.synthetic_sft_size", "64",
                  "--data.init_args.synthetic_train_size", "64", "--data.init_args.synthetic_val_size", "8",
                  "--trainer.val_check_interval", "1"],
    "mae_pretrain_cxr": ["--data.init_args.phantom_patients", "24", "--trainer.limit_train_batches", "2",
                         "--trainer.check_val_every_n_epoch", "1"],
    "vit_finetune_cxr": ["--data.init_args.phantom_patients", "24", "--trainer.limit_train_batches", "2"],
}


def run_recipe(subcommand: str, recipe: str, root: Path, *extra: str) -> Path:
    """Run ``subcommand`` of a shipped recipe briefly with logs and data under ``root``; returns the run folder."""
    data = ["--data.init_args.synthetic_dir", str(root / "synthetic")] if "cxr" not in recipe else \
        ["--data.init_args.phantom_dir", str(root / "phantom")]
    argv = [subcommand, "--config", str(CONFIG_DIR / f"{recipe}.yaml"), "--trainer.default_root_dir",
            str(root / "runs"), *QUICK, *SHORT_DATA.get(recipe, []), *data, *extra]
    with mock.patch.object(sys, "argv", ["recipes"]):  # LightningCLI reads args only from argv here
        main(argv)
    runs = sorted((root / "runs" / recipe).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return runs[-1] if runs else root / "runs" / recipe


def last_checkpoint(run_dir: Path) -> Path:
    found = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert found, f"no checkpoint in {run_dir}"
    return found[-1]
