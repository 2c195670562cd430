"""Throughput on the dashboard: samples/s, tokens/s and FLOPs/s of a recipe run in metrics.csv; MFU where the
device's peak is known, none (and no error) on the CPU."""

import csv

import pytest
import torch
from torch import nn

from callbacks.run import throughput
from callbacks.run.throughput import ThroughputLogger, batch_samples, batch_tokens, matmul_parameters
from recipes.__main__ import main
from recipes.cli import CONFIG_DIR
from tests.conftest import SMOKE_ARGS

RATES = ["throughput/samples_per_sec", "throughput/tokens_per_sec", "throughput/flops_per_sec"]


def test_counts_of_padded_packed_and_image_batches():
    ids = torch.zeros(2, 5, dtype=torch.long)
    padded = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])}
    packed = {"input_ids": ids, "num_tokens": torch.tensor([5, 4])}
    images = {"image": torch.zeros(3, 1, 8, 8)}
    assert [batch_samples(b) for b in (padded, packed, images)] == [2, 2, 3]
    assert [batch_tokens(b) for b in (padded, packed, images)] == [7, 9, None]
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False))
    assert matmul_parameters(tied) == 4 * 4 + 4 + 40  # the lookup table is no matmul
    tied[2].weight = tied[0].weight
    assert matmul_parameters(tied) == 4 * 4 + 4 + 40  # ... unless it is also the output head
    with pytest.raises(ValueError, match="window_size must be at least 2"):
        ThroughputLogger(window_size=1)


def _run(tmp_path, *extra: str) -> list[dict]:
    main(["fit", "--config", str(CONFIG_DIR / "sft.yaml"), *SMOKE_ARGS, "--trainer.max_steps=5",
          "--trainer.limit_train_batches=5", f"--trainer.default_root_dir={tmp_path}", "--data.packing=true",
          "--data.synthetic_train_size=64", "--data.batch_size=4", f"--data.synthetic_dir={tmp_path / 'syn'}",
          "--trainer.callbacks+=callbacks.ThroughputLogger", "--trainer.callbacks.window_size=2", *extra])
    return list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))


def test_a_packed_recipe_run_logs_throughput_and_no_mfu_on_the_cpu(tmp_path, cli_argv):
    rows = _run(tmp_path)
    for name in RATES:
        values = [float(r[name]) for r in rows if r.get(name)]
        assert len(values) == 4 and all(v > 0 for v in values), name  # from the second step on
    assert "throughput/mfu" not in rows[0]
    padding = [float(r["data/padding_fraction"]) for r in rows if r.get("data/padding_fraction")]
    assert len(padding) == 5 and all(0.0 <= p < 0.5 for p in padding)


def test_mfu_is_flops_per_second_over_the_peak(tmp_path, cli_argv, monkeypatch):
    monkeypatch.setattr(throughput, "peak_flops", lambda device, dtype: 1e9)
    rows = [r for r in _run(tmp_path) if r.get("throughput/mfu")]
    assert len(rows) == 4
    for r in rows:
        assert float(r["throughput/mfu"]) == pytest.approx(float(r["throughput/flops_per_sec"]) / 1e9)


@pytest.mark.parametrize(("name", "dtype", "peak"), [
    ("NVIDIA H200", torch.bfloat16, 989.4e12),  # Lightning: unknown name
    ("NVIDIA H200 NVL", torch.bfloat16, 835.5e12),  # Lightning: the sparse figure
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),
    ("NVIDIA H100", torch.float16, 989.4e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),  # Lightning's table
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("Some Future GPU", torch.bfloat16, None),
])
def test_peak_flops_are_dense_peaks_by_card_name(monkeypatch, caplog, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    with caplog.at_level("INFO", logger=throughput.__name__):
        assert throughput.peak_flops(torch.device("cuda", 0), dtype) == peak  # no warning (pytest: errors)
    assert ("No peak FLOP/s known" in caplog.text) == (peak is None)


def test_peak_flops_of_float32_follow_the_matmul_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert throughput.peak_flops(torch.device("cuda"), torch.float32) == 67e12
        torch.set_float32_matmul_precision("high")
        assert throughput.peak_flops(torch.device("cuda"), torch.float32) == 494.7e12
    finally:
        torch.set_float32_matmul_precision(before)
    assert throughput.peak_flops(torch.device("cpu"), torch.bfloat16) is None
