"""Short runs of the shipped recipes through ``python -m recipes`` (in-process), shared by the workflow tests."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

from recipes.__main__ import main
from recipes.cli import CONFIG_DIR

QUICK = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
         "--trainer.log_every_n_steps", "1", "--wandb", "disabled"]
SHORT_DATA = {
    "sft": ["--data.init_args.synthetic_train_size", "100", "--trainer.val_check_interval", "2"],
    "lisa_sft": ["--data.init_args.synthetic_train_size", "100", "--trainer.val_check_interval", "2"],
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
