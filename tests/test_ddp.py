"""Every recipe under two-process plain DDP (``--trainer.strategy=ddp``, as the README shows; gloo, CPU): identical
weights and identical callback choices on both ranks. Callbacks that freeze or skip blocks set DDP up themselves."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, EXTRA_SMOKE_ARGS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_two_rank_ddp_stays_in_sync(path, tmp_path):
    out = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "recipes", "fit", "--config", str(path), "--wandb=disabled",
           f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.accelerator=cpu", "--trainer.devices=2",
           "--trainer.strategy=ddp", "--trainer.max_steps=4",
           "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1.0",
           "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
           "--trainer.callbacks+=tests.probe_callbacks.RankStateDump", f"--trainer.callbacks.out_dir={out}",
           *EXTRA_SMOKE_ARGS.get(path.stem, [])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["step"] == ranks[1]["step"] > 0
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["callbacks"] == ranks[1]["callbacks"]
    assert [(out / f"rank{r}_pg_at_exit.txt").read_text() for r in (0, 1)] == ["released"] * 2
