"""``--ckpt_path last|auto`` finds the newest valid checkpoint of the run; the resume rule; continued logs."""

import csv
import os

import pytest
import torch

from recipes import resume
from recipes.__main__ import main
from recipes.cli import CONFIG_DIR
from recipes.parts.loggers import ContinuingCSVLogger, default_loggers
from recipes.resume import CheckpointError, check_resume, resolve, resume_command

SFT_HPARAMS = {"_class_path": "recipes.CausalLMModule", "model_path": None, "tokenizer_name": None,
               "model_config": {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 4},
               "warmup_steps": 50, "gradient_checkpointing": False, "_instantiator": "x"}


def _ckpt(path, step, hparams=SFT_HPARAMS, mtime=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": step, "hyper_parameters": hparams}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_last_picks_the_newest_checkpoint_that_loads_across_versions(tmp_path):
    old = _ckpt(tmp_path / "sft/version_0/checkpoints/epoch=0-step=10.ckpt", 10, mtime=1_000)
    good = _ckpt(tmp_path / "sft/version_1/checkpoints/last.ckpt", 20, mtime=2_000)
    broken = _ckpt(tmp_path / "sft/version_2/checkpoints/last.ckpt", 30, mtime=3_000)
    broken.write_bytes(broken.read_bytes()[:200])  # truncated by a kill
    _ckpt(tmp_path / "other/version_5/checkpoints/last.ckpt", 99, mtime=4_000)  # another run name: never picked

    for mode in ("last", "auto"):
        plan, ckpt = resolve(mode, tmp_path, "sft")
        assert plan.path == str(good) and plan.version == "version_1" and ckpt["global_step"] == 20
        assert f"skipped Checkpoint {broken} (200 bytes) is truncated or corrupt" in plan.notes[0]
        assert plan.notes[1] == (f"--ckpt_path {mode}: resuming from {good} (step 20), the newest checkpoint "
                                 "that loads")
    with pytest.raises(CheckpointError, match=rf"Checkpoint {broken} \(200 bytes\) is truncated or corrupt"):
        resolve(str(broken), tmp_path, "sft")
    plan, _ = resolve(str(old), tmp_path, "sft")  # an explicit file of the run continues in its own folder
    assert plan.version == "version_0"


def test_auto_starts_fresh_and_last_fails_when_the_run_has_no_checkpoint(tmp_path):
    plan, ckpt = resolve("auto", tmp_path, "sft")
    assert plan.path is None and ckpt is None and "starting a new run" in plan.notes[0]
    with pytest.raises(CheckpointError, match=r"--ckpt_path last: no checkpoint under .*sft/version_\*"):
        resolve("last", tmp_path, "sft")
    broken = _ckpt(tmp_path / "sft/version_0/checkpoints/last.ckpt", 3)
    broken.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"none of the 1 checkpoints under .* loads"):
        resolve("auto", tmp_path, "sft")


def test_resume_rule_defining_settings_must_match_changeable_ones_are_listed():
    model = {"class_path": "recipes.CausalLMModule",
             "init_args": {**{k: v for k, v in SFT_HPARAMS.items() if not k.startswith("_")},
                           "gradient_checkpointing": True, "warmup_steps": 5,
                           "optimizer": {"class_path": "torch.optim.AdamW"}}}
    notes = check_resume({"hyper_parameters": SFT_HPARAMS}, "x.ckpt", model, None)
    assert notes == ["Resuming with settings changed since the checkpoint (the values given now are used):\n"
                     "  model.gradient_checkpointing: checkpoint False, now True\n"
                     "  model.warmup_steps: checkpoint 50, now 5"]
    model["init_args"]["model_config"] = {**SFT_HPARAMS["model_config"], "hidden_size": 64}
    model["class_path"] = "recipes.GRPOModule"
    with pytest.raises(CheckpointError) as info:
        check_resume({"hyper_parameters": SFT_HPARAMS}, "x.ckpt", model, None)
    message = str(info.value)
    assert "Checkpoint x.ckpt is of a different model or recipe" in message
    assert "model.class_path: checkpoint 'recipes.CausalLMModule', now 'recipes.GRPOModule'" in message
    assert "model.model_config.hidden_size: checkpoint 128, now 64" in message
    assert "gradient_checkpointing" not in message


def test_cli_stops_before_training_on_a_checkpoint_of_another_model_size(tmp_path, monkeypatch, cli_argv):
    monkeypatch.chdir(tmp_path)
    hparams = {**SFT_HPARAMS, "model_config": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384,
                                               "num_hidden_layers": 4, "num_attention_heads": 4,
                                               "num_key_value_heads": 4, "max_position_embeddings": 256,
                                               "tie_word_embeddings": False}}
    _ckpt(tmp_path / "runs/sft/version_0/checkpoints/last.ckpt", 5, hparams)
    with pytest.raises(CheckpointError, match=r"model.model_config.hidden_size: checkpoint 128, now 32"):
        main(["fit", "--config", str(CONFIG_DIR / "sft.yaml"), "--trainer.default_root_dir=runs", "--wandb=disabled",
              "--model.init_args.model_config.hidden_size=32", "--ckpt_path", "last"])
    assert not (tmp_path / "runs/sft/version_1").exists()


def test_continuing_csv_keeps_rows_before_the_resumed_step(tmp_path):
    first = ContinuingCSVLogger(tmp_path, name="run", version="version_0")
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.log_metrics({"train/loss": 0.5}, step=1)
    first.log_metrics({"train/loss": 0.4}, step=2)  # logged after the checkpoint: lost work, logged again below
    first.save()
    second = ContinuingCSVLogger(tmp_path, name="run", version="version_0")
    second.log_metrics({"train/loss": 0.45, "val/loss": 0.7}, step=2)
    second.save()
    rows = list(csv.DictReader((tmp_path / "run/version_0/metrics.csv").open()))
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [
        ("0", "1.0", ""), ("1", "0.5", ""), ("2", "0.45", "0.7")]


def test_wandb_resumes_the_same_run_id_in_the_same_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    first = default_loggers(tmp_path, "sft", wandb="offline")
    run_id = first[1]._wandb_init["id"]
    again = default_loggers(tmp_path, "sft", wandb="offline", version="version_0")
    assert again[0].log_dir == first[0].log_dir and isinstance(again[0], ContinuingCSVLogger)
    assert again[1]._wandb_init["id"] == run_id and again[1]._wandb_init["resume"] == "allow"
    assert default_loggers(tmp_path, "sft", wandb="offline")[1]._wandb_init["id"] != run_id  # a new run: new id


def test_resume_command_replaces_any_ckpt_path():
    argv = ["fit", "--config", "a b.yaml", "--ckpt_path", "old.ckpt", "--ckpt_path=x", "--trainer.max_steps=5"]
    assert resume_command(argv, "runs/sft/version_0/checkpoints/last.ckpt") == (
        "python -m recipes fit --config 'a b.yaml' --trainer.max_steps=5 --ckpt_path "
        "runs/sft/version_0/checkpoints/last.ckpt")
    assert resume.untrained_note({"ckpt_path": None, "model": {"init_args": {"model_path": "hf/dir"}}}) is None


def test_new_learning_rate_and_weight_decay_apply_on_resume(tmp_path, caplog):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from callbacks.run.resume_settings import OptimizerSettingsOnResume

    class Scheduled(BoringModel):
        def __init__(self, lr, wd):
            super().__init__()
            self.lr, self.wd = lr, wd

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.wd)
            return [opt], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1)),
                            "interval": "step"}]

    def fit(module, steps, ckpt=None):
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                            callbacks=[OptimizerSettingsOnResume()])
        trainer.fit(module, ckpt_path=ckpt)
        return trainer

    first = fit(Scheduled(0.1, 0.0), 3)
    first.save_checkpoint(tmp_path / "a.ckpt")
    with caplog.at_level("INFO"):
        second = fit(Scheduled(0.5, 0.2), 5, tmp_path / "a.ckpt")
    group = second.optimizers[0].param_groups[0]
    assert group["weight_decay"] == 0.2 and group["initial_lr"] == 0.5
    assert group["lr"] == pytest.approx(0.5 / 6)  # the new peak under the schedule at step 5
    assert "optimizer 0 group 0 weight_decay: checkpoint 0.0, now 0.2" in caplog.text
