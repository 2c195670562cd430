"""Preemption by a real signal saves the step reached and exits non-zero; the printed command resumes the same run."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.run.periodic_checkpoint import PeriodicLastCheckpoint
from callbacks.run.preemption import Preempted, PreemptionCheckpoint
from recipes.cli import CONFIG_DIR
from tests.conftest import fake_slurm_job

REPO = Path(__file__).resolve().parents[1]


class SignalAtStep(L.Callback):
    """Sends ``signum`` to this process in the middle of optimizer step ``step`` (before its optimizer step)."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            signal.raise_signal(self.signum)


def _trainer(tmp_path, *callbacks, max_steps=20):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks),
                     default_root_dir=tmp_path)


@pytest.mark.parametrize("name,code", [("SIGUSR1", 138), ("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_saves_step_reached_and_exits_with_128_plus_signal(tmp_path, name, code):
    signum = getattr(signal, name)
    before = signal.getsignal(signum)
    trainer = _trainer(tmp_path, PreemptionCheckpoint(), SignalAtStep(signum, 4))
    with pytest.raises(Preempted) as info:
        trainer.fit(BoringModel())
    err = info.value
    assert err.code == code and err.step == 5 and not err.requeued  # the step in progress is finished first
    assert err.path == str(tmp_path / "checkpoints" / "last.ckpt")
    assert torch.load(err.path, weights_only=True)["global_step"] == 5
    assert f"{name} received: saved the checkpoint of step 5 to {err.path}; exiting with status {code}" == str(err)
    assert signal.getsignal(signum) == before  # handlers are put back


def test_periodic_last_checkpoint_by_steps_and_by_time(tmp_path, monkeypatch):
    by_steps = PeriodicLastCheckpoint(every_n_minutes=None, every_n_steps=3)
    step_saves = []
    save_by_steps = by_steps.save
    monkeypatch.setattr(by_steps, "save",
                        lambda trainer: step_saves.append(trainer.global_step) or save_by_steps(trainer))
    _trainer(tmp_path / "a", by_steps, max_steps=7).fit(BoringModel())
    assert step_saves == [3, 6, 7]  # every 3 steps, and once more when the fit ends
    assert torch.load(by_steps.last_path, weights_only=True)["global_step"] == 7

    clock = iter(range(0, 10_000, 50))  # 50 s per call of time.monotonic
    monkeypatch.setattr("callbacks.run.periodic_checkpoint.monotonic", lambda: float(next(clock)))
    saves = []
    by_time = PeriodicLastCheckpoint(every_n_minutes=1.5, every_n_steps=None)
    save = by_time.save
    monkeypatch.setattr(by_time, "save", lambda trainer: saves.append(trainer.global_step) or save(trainer))
    _trainer(tmp_path / "b", by_time, max_steps=6).fit(BoringModel())
    assert saves == [2, 4, 6]  # 50 s between checks: the 90 s interval is passed every second step; 6 is the end
    with pytest.raises(ValueError, match="every_n_steps must be >= 0"):
        PeriodicLastCheckpoint(every_n_steps=-1)


def _cmd(root, *extra):
    return [sys.executable, "-m", "recipes", "fit", "--config", str(CONFIG_DIR / "sft.yaml"), "--wandb=disabled",
            f"--trainer.default_root_dir={root}", "--trainer.max_steps=30", "--trainer.accelerator=cpu",
            "--trainer.val_check_interval=10", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1", "--data.init_args.synthetic_train_size=64",
            "--data.init_args.batch_size=4",
            f"--data.init_args.synthetic_dir={root / 'syn'}", "--model.init_args.model_config.hidden_size=32",
            "--model.init_args.model_config.intermediate_size=64", "--model.init_args.exact_match_batches=0",
            "--trainer.callbacks+=tests.probe_callbacks.PrintSteps", *extra]


@pytest.mark.slow
def test_sigterm_to_a_real_run_then_auto_resume_continues_the_same_run_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd(tmp_path), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= 12:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    last = tmp_path / "sft" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["global_step"]
    assert 12 <= saved <= 14 and f"saved the checkpoint of step {saved} to {last}" in err
    assert f"--ckpt_path {last}" in err and "Resume with:" in err
    rows_before = list(csv.DictReader((last.parents[1] / "metrics.csv").open()))

    time.sleep(0.01)
    resumed = subprocess.run(_cmd(tmp_path, "--ckpt_path", "auto", "--model.init_args.gradient_checkpointing=true"),
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"--ckpt_path auto: resuming from {last} (step {saved})" in resumed.stderr
    assert "model.gradient_checkpointing: checkpoint False, now True" in resumed.stderr
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == ["latest", "version_0"]  # no version_1
    assert f"step {saved + 1}\n" in resumed.stdout and f"step {saved}\n" not in resumed.stdout
    rows = list(csv.DictReader((last.parents[1] / "metrics.csv").open()))
    train = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert train == sorted(set(train)) and train[-1] == 29  # no step twice, up to the last one
    kept = [(r["step"], r["train/loss"]) for r in rows_before if r.get("train/loss") and int(r["step"]) < saved - 1]
    assert kept and kept == [(r["step"], r["train/loss"]) for r in rows if r.get("train/loss")][: len(kept)]
    assert torch.load(last, weights_only=True)["global_step"] >= saved
    assert [torch.load(p, weights_only=True)["global_step"] for p in last.parent.glob("*step=30.ckpt")] == [30]


def test_under_slurm_rank_zero_requeues_the_job_after_saving(tmp_path, monkeypatch):
    fake_slurm_job(tmp_path, monkeypatch)
    trainer = _trainer(tmp_path, PreemptionCheckpoint(requeue=True), SignalAtStep(signal.SIGUSR1, 2))
    with pytest.raises(Preempted) as info:
        trainer.fit(BoringModel())
    assert info.value.requeued and "the SLURM job was requeued" in str(info.value)
    assert (tmp_path / "scontrol_called").read_text().split() == ["requeue", "4242"]
    assert torch.load(info.value.path, weights_only=True)["global_step"] == 3


class SigtermDuringValidation(L.Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        signal.raise_signal(signal.SIGTERM)


def test_sigterm_during_validate_exits_143_not_0(tmp_path, monkeypatch):
    from recipes.__main__ import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info, pytest.warns(UserWarning, match="UNTRAINED MODEL"):
        main(["validate", "--config", str(CONFIG_DIR / "sft.yaml"), "--trainer.default_root_dir=runs",
              "--wandb=disabled", "--trainer.accelerator=cpu", "--trainer.limit_val_batches=3",
              "--trainer.enable_progress_bar=false", "--data.init_args.synthetic_train_size=40",
              "--data.init_args.synthetic_dir=syn", "--model.init_args.model_config.hidden_size=16",
              "--model.init_args.model_config.intermediate_size=32", "--model.init_args.exact_match_batches=0",
              "--trainer.callbacks+=tests.test_preemption.SigtermDuringValidation"])
    assert info.value.code == 143  # Lightning alone stops a SIGTERM-ed evaluation with status 0
