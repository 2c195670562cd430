"""The NaN guard and the preemption handler stop every DDP rank at the same step when only one rank sees the NaN
or the signal (no rank left waiting in a collective)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path, mode):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_stop_worker.py"), str(tmp_path), mode],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    return proc, [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]


@pytest.mark.slow
def test_nan_on_one_rank_stops_both_ranks_at_the_same_step(tmp_path):
    proc, (rank0, rank1) = _run(tmp_path, "nan")
    assert proc.returncode != 0
    assert rank1.startswith("Training loss is nan at global step 3 (epoch 0, batch 2, rank 1)")
    assert rank0.startswith("Training loss is non-finite on another rank (here ")
    assert "at global step 3 (epoch 0, batch 2, rank 0)" in rank0


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_once_and_stops_both(tmp_path):
    proc, ranks = _run(tmp_path, "sigterm")
    assert proc.returncode == 143, proc.stderr[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert ranks == [f"SIGTERM received: saved the checkpoint of step 3 to {last}; exiting with status 143"] * 2
    assert torch.load(last, weights_only=True)["global_step"] == 3
    # each rank's process group is destroyed before the interpreter exits (gloo's threads could abort it otherwise)
    assert sorted(p.read_text() for p in tmp_path.glob("pg_at_exit_*.txt")) == ["released", "released"]
