"""A run killed by SIGKILL, checkpointing every N steps, loses at most N steps and resumes to the same weights."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.cli import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
EVERY = 5


def _cmd(tmp_path, name, extra=()):
    return [sys.executable, "-m", "recipes", "fit", "--config", str(CONFIG_DIR / "sft.yaml"), "--wandb=disabled",
            f"--trainer.default_root_dir={tmp_path / name}", "--trainer.max_steps=24", "--trainer.accelerator=cpu",
            "--trainer.val_check_interval=10", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--data.init_args.synthetic_train_size=64", "--data.init_args.batch_size=4",
            "--model.init_args.model_config.hidden_size=32", "--model.init_args.model_config.intermediate_size=64",
            "--model.init_args.exact_match_batches=0",
            "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={tmp_path / name / 'ckpt'}",
            f"--trainer.callbacks.every_n_train_steps={EVERY}", "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.save_top_k=-1",
            "--trainer.callbacks+=tests.probe_callbacks.PrintSteps",
            "--trainer.callbacks+=tests.probe_callbacks.RankStateDump",
            f"--trainer.callbacks.out_dir={tmp_path / name}",
            *extra]


@pytest.mark.slow
def test_sigkill_loses_at_most_n_steps_and_resumes_exactly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    full = subprocess.run(_cmd(tmp_path, "full"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    proc = subprocess.Popen(_cmd(tmp_path, "killed"), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    killed_at = 0
    for line in proc.stdout:
        if line.startswith("step "):
            killed_at = int(line.split()[1])
            if killed_at >= 13:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "rank0.json").exists()
    last = tmp_path / "killed" / "ckpt" / "last.ckpt"
    saved_step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    assert killed_at - EVERY <= saved_step <= killed_at

    resumed = subprocess.run(_cmd(tmp_path, "killed", ["--ckpt_path", str(last)]), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "full" / "rank0.json").read_text())
    b = json.loads((tmp_path / "killed" / "rank0.json").read_text())
    assert a["step"] == b["step"] == 24
    assert a["weights"] == b["weights"]
