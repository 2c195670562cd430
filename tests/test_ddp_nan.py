"""The NaN guard stops every DDP rank at the same step when only one rank sees the NaN (no rank left waiting)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_nan_on_one_rank_stops_both_ranks_at_the_same_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "nan_ddp_worker.py"), str(tmp_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert rank1.startswith("Training loss is nan at global step 3 (epoch 0, batch 2, rank 1)")
    assert rank0.startswith("Training loss is non-finite on another rank (here ")
    assert "at global step 3 (epoch 0, batch 2, rank 0)" in rank0
