"""Documented workflows: LoRA from the command line, GRPO after SFT, run folders, the console and the dashboard."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.model_summary import summarize
from peft import PeftModel

from callbacks.core.image_log import to_uint8_hwc
from callbacks.lisa import LISA
from callbacks.mae_reconstruction import MAEReconstructionLogger
from callbacks.run.progress import StepProgressBar
from datamodules.tokenizer import load_tokenizer
from recipes.__main__ import main
from recipes.cli import CONFIG_DIR, RecipesCLI
from recipes.grpo.checks import ZeroRewardStreak, check_sft_fits_verifier
from recipes.parts import loggers as loggers_module
from recipes.parts.auroc import log_auroc_table, write_auroc_table
from recipes.parts.hf_model import build_causal_lm
from recipes.parts.loggers import default_loggers, eval_loggers
from tests.conftest import TINY_LM_CONFIG as TINY
from tests.conftest import fit_grpo, grpo_data, grpo_module

SFT = str(CONFIG_DIR / "sft.yaml")


def cli(tmp_path, *args: str) -> RecipesCLI:
    return RecipesCLI(args=["--config", SFT, "--trainer.default_root_dir", str(tmp_path / "runs"), "--wandb",
                            "disabled", "--data.init_args.synthetic_dir", str(tmp_path / "syn"), *args], run=False)


# ------------------------------------------------------------------------------------------------- 1. LoRA
@pytest.mark.parametrize("args", [["--model.init_args.lora.r", "4"], ["--model.init_args.lora", "{r: 4, alpha: 16}"],
                                  ["--config", "LORA_YAML"]])
def test_lora_from_the_command_line_and_yaml(tmp_path, monkeypatch, args):
    monkeypatch.setattr(sys, "argv", ["recipes"])
    if "LORA_YAML" in args:
        (tmp_path / "lora.yaml").write_text("model:\n  init_args:\n    lora: {r: 4, alpha: 16}\n")
        args = ["--config", str(tmp_path / "lora.yaml")]
    c = cli(tmp_path, *args)
    assert (c.model.lora.r, c.model.lora.alpha) == (4, 16)
    assert c.model.hparams.lora == {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
    c.model.tokenizer = c.datamodule.tokenizer
    c.model.configure_model()
    assert isinstance(c.model.model, PeftModel)
    assert {n for n, p in c.model.named_parameters() if p.requires_grad} == \
        {n for n, _ in c.model.named_parameters() if "lora_" in n}


def test_lora_rejects_unknown_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipes"])
    with pytest.raises(ValueError, match=r"Unknown lora settings \['rank'\]"):
        from recipes.causal_lm import CausalLMModule

        CausalLMModule(lora={"rank": 8})


# ------------------------------------------------------------------------------------------ 1. GRPO after SFT
def test_sft_format_must_fit_the_strict_verifier(tmp_path):
    from datamodules.rewards import GSM8KReward

    strict, flexible = GSM8KReward("strict"), GSM8KReward("flexible")
    with pytest.raises(ValueError, match="synthetic 'chat' data.*gsm8k_flexible"):
        check_sft_fits_verifier({"train_file": None, "synthetic_format": "chat"}, strict, "sft.ckpt")
    check_sft_fits_verifier({"train_file": None, "synthetic_format": "gsm8k"}, strict, "sft.ckpt")
    check_sft_fits_verifier({"train_file": None, "synthetic_format": "chat"}, flexible, "sft.ckpt")
    bare, marked = tmp_path / "bare.jsonl", tmp_path / "marked.jsonl"
    bare.write_text(json.dumps({"instruction": "Add 2+3", "output": "5"}) + "\n")
    marked.write_text(json.dumps({"question": "Add 2+3", "answer": "2+3=5\n#### 5"}) + "\n")
    with pytest.raises(ValueError, match="bare.jsonl"):
        check_sft_fits_verifier({"train_file": str(bare), "synthetic_format": "chat"}, strict, "sft.ckpt")
    check_sft_fits_verifier({"train_file": str(marked), "synthetic_format": "chat"}, strict, "sft.ckpt")


def _sft_checkpoint(tmp_path, synthetic_format: str):
    from recipes.causal_lm import CausalLMModule

    sft = CausalLMModule(model_config=TINY, tokenizer_name="char")
    sft.configure_model()
    path = tmp_path / f"sft_{synthetic_format}.ckpt"
    torch.save({"state_dict": sft.state_dict(), "hyper_parameters": dict(sft.hparams),
                "datamodule_hyper_parameters": {"train_file": None, "synthetic_format": synthetic_format,
                                                "tokenizer": "char"}}, path)
    return path


def test_grpo_from_a_bare_answer_sft_checkpoint_stops_at_fit_start(tmp_path):
    m = grpo_module(model_config=None, sft_checkpoint=str(_sft_checkpoint(tmp_path, "chat")))
    with pytest.raises(ValueError, match="do not end with '#### <number>'"):
        fit_grpo(tmp_path, m, steps=1)


def test_zero_reward_streak_warns_once_per_streak():
    streak = ZeroRewardStreak(patience=3)
    with pytest.warns(UserWarning, match="last 3 rollout batches was 0") as record:
        fired = [streak.update(z) for z in [True, True, True, True, True, False, True, True, True]]
    assert fired == [False, False, True, False, False, False, False, False, True] and len(record) == 2


def test_grpo_warns_when_every_reward_is_zero(tmp_path):
    torch.manual_seed(0)
    m = grpo_module(zero_reward_patience=2, reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(completions)])
    with pytest.warns(UserWarning, match="last 2 rollout batches was 0: GRPO has nothing to learn"):
        fit_grpo(tmp_path, m, steps=2)


# ------------------------------------------------------------------------------------- 3. eval beside the run
def test_eval_loggers_write_into_the_checkpoints_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train = default_loggers(tmp_path / "runs", "sft", wandb="offline")
    ckpt = tmp_path / "runs" / "sft" / "version_0" / "checkpoints" / "epoch=0-step=2.ckpt"
    first = eval_loggers(ckpt, "test", wandb="offline")
    second = eval_loggers(ckpt, "test", wandb="offline")
    assert first[0].log_dir == str(tmp_path / "runs" / "sft" / "version_0" / "eval" / "test_0")
    assert second[0].log_dir.endswith("eval/test_1")
    assert train[1]._wandb_init["group"] == first[1]._wandb_init["group"] == "sft/version_0"
    assert first[1]._wandb_init["job_type"] == "test"


def test_latest_names_the_newest_run_and_eval_through_it_groups_with_that_version(tmp_path):
    default_loggers(tmp_path / "runs", "sft", wandb="disabled")
    default_loggers(tmp_path / "runs", "sft", wandb="disabled")
    latest = tmp_path / "runs" / "sft" / "latest"
    assert latest.is_symlink() and latest.resolve() == (tmp_path / "runs" / "sft" / "version_1").resolve()
    evaluation = eval_loggers(latest / "checkpoints" / "last.ckpt", "test", wandb="disabled")
    assert Path(evaluation[0].log_dir).resolve() == (tmp_path / "runs" / "sft" / "version_1" / "eval" / "test_0")
    assert default_loggers(tmp_path / "runs", "sft", wandb="disabled")[0].log_dir.endswith("version_2")


def test_eval_of_a_read_only_run_writes_under_the_root_or_eval_root(tmp_path, monkeypatch):
    run = tmp_path / "shared" / "sft" / "version_3"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    real_access = loggers_module.os.access
    monkeypatch.setattr(loggers_module.os, "access", lambda p, mode: Path(p) != run and real_access(p, mode))
    loggers = eval_loggers(ckpt, "test", wandb="disabled", fallback_root=tmp_path / "runs")
    assert loggers[0].log_dir == str(tmp_path / "runs" / "sft" / "version_3" / "eval" / "test_0")
    mine = eval_loggers(ckpt, "validate", wandb="disabled", eval_root=tmp_path / "mine")
    assert mine[0].log_dir == str(tmp_path / "mine" / "sft" / "version_3" / "eval" / "validate_0")
    assert not (run / "eval").exists()


# --------------------------------------------------------------------------------------------- 4. dashboard
def test_images_for_wandb_are_uint8_and_not_black():
    grid = torch.rand(3, 10, 12) * 0.5 + 0.25
    image = to_uint8_hwc(grid)
    assert image.dtype == np.uint8 and image.shape == (10, 12, 3)
    assert np.array_equal(image, (grid * 255).round().byte().permute(1, 2, 0).numpy())
    assert np.asarray(wandb.Image(image).image).max() == image.max() > 0


class RecordingWandb(WandbLogger):
    def __init__(self):
        super().__init__(offline=True)
        self.calls = []

    def log_table(self, key, columns=None, data=None, **kwargs):
        self.calls.append((key, columns, data))

    def log_image(self, key, images, **kwargs):
        self.calls.append((key, images))


def test_auroc_table_and_plot_go_to_wandb(tmp_path):
    csv_path, png_path = write_auroc_table(tmp_path / "test_auroc", ["A", "B"], [0.75, None], [3, 0], [5, 8], 0.75)
    logger = RecordingWandb()
    log_auroc_table([logger], csv_path, png_path)
    assert logger.calls[0] == ("test/auroc_table", ["label", "auroc", "positives", "negatives"],
                               [["A", "0.7500", "3", "5"], ["B", "undefined", "0", "8"], ["macro", "0.7500", "3",
                                                                                           "13"]])
    assert logger.calls[1] == ("test/auroc_plot", [str(png_path)])


def test_run_config_goes_to_wandb_as_a_nested_dict(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", ["recipes"])
    c = RecipesCLI(args=["--config", SFT, "--trainer.default_root_dir", str(tmp_path / "runs"),
                         "--data.init_args.synthetic_dir", str(tmp_path / "syn")], run=False)
    wandb_logger = next(lg for lg in c.trainer.loggers if isinstance(lg, WandbLogger))
    c.trainer.callbacks[[type(cb).__name__ for cb in c.trainer.callbacks].index("RunConfigSaver")].save_config(
        c.trainer, c.model, "fit")
    config = wandb_logger.experiment.config
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.003
    assert config["trainer"]["max_steps"] == 2000 and "cli" not in config
    wandb_logger.experiment.finish()


def test_mae_reconstructions_fire_on_validation_runs_of_the_shipped_schedule():
    callback = MAEReconstructionLogger(every_n_epochs=10)
    fired = []
    for epoch in range(4, 40, 5):  # check_val_every_n_epoch: 5 validates at the end of epochs 4, 9, 14, ...
        if callback.due(epoch):
            fired.append(epoch)
            callback._last_epoch = epoch
    assert fired == [4, 14, 24, 34]
    restored = MAEReconstructionLogger(every_n_epochs=10)
    restored.load_state_dict(callback.state_dict())
    assert not restored.due(39) and restored.due(44)


# -------------------------------------------------------------------------------------------- 5. console
class TrainableAtFitStart(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.trainable = summarize(pl_module).trainable_parameters


def test_model_summary_under_lisa_counts_the_parameters_trainable_at_a_time(tmp_path):
    from tests.conftest import TinyModule, tiny_loader, trainer

    lm = TinyModule(layers=4)
    probe = TrainableAtFitStart()
    lisa = LISA(n_layers=1, interval=1)
    trainer([lisa, probe], 1, tmp_path).fit(lm, tiny_loader(batches=2))
    block = sum(p.numel() for p in lisa._block_params[0])
    assert probe.trainable == sum(p.numel() for p in lisa._always_on) + block < sum(p.numel() for p in lm.parameters())


class BarTotals(L.Callback):
    def __init__(self):
        self.totals = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.totals.append(trainer.progress_bar_callback.total_train_batches)


def test_grpo_progress_bar_total_counts_rollout_batches(tmp_path):
    torch.manual_seed(0)
    m = grpo_module(mu=2, num_mini_batches=2)
    totals = BarTotals()
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[StepProgressBar(), totals],
                        default_root_dir=tmp_path)
    trainer.fit(m, datamodule=grpo_data(tmp_path))
    assert totals.totals == [2] and trainer.fit_loop.epoch_loop.batch_progress.current.completed == 2


def test_resumed_bar_counts_from_the_epoch_start():
    bar = StepProgressBar()
    progress = SimpleNamespace(current=SimpleNamespace(completed=20))
    bar._trainer = SimpleNamespace(num_training_batches=188, max_steps=2000, global_step=1900,
                                   accumulate_grad_batches=1, lightning_module=object(),
                                   fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))
    assert bar.total_train_batches == 120  # resumed at batch 20 of the epoch, 100 steps to go


def test_v_num_is_the_run_version(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipes"])
    for version in ("0", "1"):
        c = cli(tmp_path)
        bar = c.trainer.progress_bar_callback
        assert isinstance(bar, StepProgressBar)
        assert bar.get_metrics(c.trainer, c.model)["v_num"] == version


def test_runs_started_at_once_never_share_a_version_folder(tmp_path):
    barrier, dirs = threading.Barrier(8), []

    def start():
        barrier.wait()
        dirs.append(default_loggers(tmp_path, "same", wandb="disabled")[0].log_dir)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(dirs)) == 8 and sorted(p.name for p in (tmp_path / "same").iterdir() if p.name != "latest") == \
        sorted(f"version_{i}" for i in range(8))
    assert (tmp_path / "same" / "latest").resolve().name in {f"version_{i}" for i in range(8)}


def test_missing_model_path_says_so_and_leaves_no_run_folder(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model_path '/no/such/model' does not exist"):
        build_causal_lm("/no/such/model", None, load_tokenizer())
    monkeypatch.setattr(sys, "argv", ["recipes"])
    with pytest.raises(FileNotFoundError, match="model_path '/no/such/model' does not exist"):
        main(["fit", "--config", SFT, "--trainer.default_root_dir", str(tmp_path / "runs"), "--wandb", "disabled",
              "--data.init_args.synthetic_dir", str(tmp_path / "syn"), "--data.init_args.synthetic_train_size", "50",
              "--model.init_args.model_path", "/no/such/model", "--model.init_args.model_config", "null"])
    assert list((tmp_path / "runs" / "sft").iterdir()) == []
