"""Every recipe YAML parses, has commented keys, and smoke-runs `fit` for a couple of batches."""

from pathlib import Path

import pytest
import yaml

from recipes.cli import CONFIG_DIR, RecipesCLI, main, recipe_summaries

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
SMOKE_ARGS = ["--trainer.max_steps=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
              "--trainer.check_val_every_n_epoch=1", "--trainer.val_check_interval=1.0", "--trainer.max_epochs=1",
              "--trainer.enable_checkpointing=false", "--trainer.accelerator=cpu", "--wandb=disabled"]
# Recipe-specific settings that keep a smoke run small (e.g. fewer calibration batches).
_SMALL_PHANTOM = ["--data.phantom_patients=8", "--data.phantom_image_size=64", "--data.batch_size=4"]
EXTRA_SMOKE_ARGS: dict[str, list[str]] = {
    "mae_pretrain_cxr": _SMALL_PHANTOM,
    "vit_finetune_cxr": _SMALL_PHANTOM,
    "vit_finetune_chexpert": _SMALL_PHANTOM,
    "grpo_llds": ["--model.init_args.sft_steps=2", "--model.init_args.num_generations=2",
                  "--model.init_args.max_new_tokens=4", "--data.init_args.synthetic_sft_size=64",
                  "--data.init_args.synthetic_train_size=32", "--data.init_args.synthetic_val_size=8",
                  "--data.init_args.val_batch_size=8"],
    "grpo_crc": ["--model.init_args.sft_steps=2", "--model.init_args.num_generations=2",
                 "--model.init_args.max_new_tokens=4", "--data.init_args.synthetic_sft_size=64",
                 "--data.init_args.synthetic_train_size=32", "--data.init_args.synthetic_val_size=8",
                 "--data.init_args.val_batch_size=8"],
}


def test_there_are_recipes():
    assert "sft" in {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_yaml_parses_and_is_documented(path: Path):
    text = path.read_text()
    assert text.startswith("# "), f"{path.name}: first line must be a '# ' one-line description"
    config = yaml.safe_load(text)
    assert {"model", "data", "trainer"} <= config.keys()
    cli = RecipesCLI(args=["--config", str(path), "--wandb=disabled"], run=False)
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_smoke_runs(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path / 'runs'}", *SMOKE_ARGS,
            *EXTRA_SMOKE_ARGS.get(path.stem, [])]
    main(args)
    metrics = list((tmp_path / "runs").rglob("metrics.csv"))
    assert metrics, "no CSV metrics written"
    header = metrics[0].read_text().splitlines()[0].split(",")
    named = [h for h in header if h not in ("epoch", "step")]
    assert named and all("/" in h for h in named), f"metric names must be <area>/<metric>: {named}"


def test_list_prints_every_recipe(capsys):
    main(["list"])
    out = capsys.readouterr().out
    for name, line in recipe_summaries().items():
        assert name in out and line in out
