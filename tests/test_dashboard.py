"""The W&B dashboard of the layer-wise techniques reads well at a real model's depth (issue 23): per-block metrics
are one panel per metric (scalars per block stay in metrics.csv), heatmaps are drawn during training, each technique
has its own prefix, callback settings are filterable config keys, MAE grids are labelled, and a resumed offline run
continues its step axis. Checked in the W&B offline files the runs write."""

from __future__ import annotations

import csv
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wandb
import yaml
from lightning.pytorch.loggers import Logger

from callbacks import LISA, BAdam, OwLore
from callbacks.mae_reconstruction import ROW_LABELS, MAEReconstructionLogger
from recipes.__main__ import main
from recipes.cli import CONFIG_DIR, callback_settings
from recipes.parts.wandb_files import history_rows, records, run_config, run_files

DEEP = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 32,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": False}
PER_BLOCK = re.compile(r"^(lisa/block_\d+|layers/[a-z_]+/\d+)$")


def deep_lisa_config(tmp_path) -> str:
    """lisa_sft.yaml with a 32-block model, LISA and diagnostics every 2 steps, heatmaps after every measurement."""
    config = yaml.safe_load((CONFIG_DIR / "lisa_sft.yaml").read_text())
    config["model"]["init_args"]["model_config"] = DEEP
    diagnostics, lisa = config["trainer"]["callbacks"]
    diagnostics["init_args"].update(interval=2, heatmap_seconds=0, probe_size=2, logit_lens=False, update_ratio=False)
    lisa["init_args"].update(interval=2, n_layers=3)
    config["data"]["init_args"].update(synthetic_train_size=64, batch_size=4, synthetic_dir=str(tmp_path / "syn"))
    config["trainer"].update(log_every_n_steps=1, val_check_interval=100, default_root_dir=str(tmp_path / "runs"))
    path = tmp_path / "deep_lisa.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    """A 32-block LISA + diagnostics run of 2 steps with W&B offline, then resumed to step 3."""
    tmp_path = tmp_path_factory.mktemp("deep")
    config = deep_lisa_config(tmp_path)
    argv = ["fit", "--config", config, "--wandb", "offline", "--trainer.limit_val_batches", "0"]
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(sys, "argv", ["recipes"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    try:
        main([*argv, "--trainer.max_steps", "2", "--last_ckpt_every_steps", "2"])
        wandb.finish()  # a new process in real use; in-process, the next run must not reuse this W&B run
        main([*argv, "--trainer.max_steps", "3", "--ckpt_path", "last"])
        wandb.finish()
    finally:
        monkeypatch.undo()
    run_dir = tmp_path / "runs" / "deep_lisa" / "version_0"
    wait_until_written(run_dir, runs=2)
    return run_dir


def wait_until_written(run_dir: Path, runs: int, timeout: float = 120.0) -> None:
    """W&B's service process may still be writing an offline run file after ``wandb.finish()`` returns (seen on a
    loaded machine: the resumed run's history was missing when read): wait for each file's closing exit record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = run_files(run_dir)
        if len(files) == runs and all(any(r.WhichOneof("record_type") == "exit" for r in records(f)) for f in files):
            return
        time.sleep(0.5)
    raise TimeoutError(f"the {runs} W&B offline runs under {run_dir} were not complete after {timeout} s")


def test_per_block_metrics_are_one_wandb_panel_per_metric_and_csv_columns(deep_run):
    first = run_files(deep_run)[0]
    keys = {key for row in history_rows(first) for key in row}
    assert not [k for k in keys if PER_BLOCK.match(k)]  # no chart per block on W&B
    images = {k.removesuffix("/_type") for k in keys if k.endswith("/_type")}  # an image is a nested value
    assert "lisa/blocks" in images  # one panel for the 32 blocks
    panels = {k for k in images if k.startswith("layers/")}
    assert {"layers/block_influence_heatmap", "layers/contribution_heatmap", "layers/grad_norm_heatmap"} <= panels
    assert len(panels) <= 8  # one per metric, whatever the depth
    heatmap_steps = [row["_step"] for row in history_rows(first) if "layers/block_influence_heatmap/_type" in row]
    assert len(heatmap_steps) >= 2  # drawn at every measurement (steps 0, 2), not only at the end
    with (deep_run / "metrics.csv").open() as f:
        columns = next(csv.reader(f))
    assert {f"lisa/block_{i}" for i in range(32)} <= set(columns)  # the exact numbers stay in the table
    assert {f"layers/block_influence/{i}" for i in range(32)} <= set(columns)
    assert (deep_run / "layer_diagnostics" / "block_influence.png").is_file()


def test_callback_settings_are_filterable_config_keys(deep_run):
    config = run_config(run_files(deep_run)[0])
    assert config["callbacks"]["lisa"]["n_layers"] == 3
    assert config["callbacks"]["layer_diagnostics"]["interval"] == 2
    assert callback_settings([{"class_path": "callbacks.OwLore", "init_args": {"n_layers": 5}},
                              {"class_path": "callbacks.LISA"}, {"class_path": "callbacks.LISA"}]) == \
        {"owlore": {"n_layers": 5}, "lisa": {}, "lisa_2": {}}


def test_a_resumed_offline_run_continues_its_step_axis(deep_run):
    first, second = run_files(deep_run)
    last = max(row["_step"] for row in history_rows(first))
    resumed = [row["_step"] for row in history_rows(second)]
    assert resumed and min(resumed) > last


def test_mae_grids_name_their_rows():
    images = torch.rand(2, 1, 32, 32)
    mask = torch.zeros_like(images)
    mask[..., :16, :] = 1
    grid = MAEReconstructionLogger(num_images=2).make_grid(images, mask, images)
    plain_width = 2 * 32 + 3 * 2  # two images and their padding
    strip = grid[0, :, : grid.shape[2] - plain_width]
    assert strip.shape[1] > 50 and grid.shape[1] == 3 * 32 + 4 * 2
    thirds = strip.chunk(len(ROW_LABELS), dim=0)
    assert all((third < 0.5).any() for third in thirds)  # text in each row's label


class Recorder(Logger):
    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.rows = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.mark.parametrize(("callback", "prefix"), [(OwLore(n_layers=1, scores=[1.0, 2.0, 3.0]), "owlore"),
                                                  (LISA(n_layers=1), "lisa"), (BAdam(), "badam")])
def test_each_technique_logs_under_its_own_prefix(callback, prefix):
    callback._block_params, callback.active = [[], [], []], [1]
    recorder = Recorder()
    callback._log_active(SimpleNamespace(loggers=[recorder], log_every_n_steps=1), 0, switched=True)
    assert recorder.rows == [(0, {f"{prefix}/block_0": 0.0, f"{prefix}/block_1": 1.0, f"{prefix}/block_2": 0.0})]
    assert callback.panel.name == f"{prefix}/blocks"
