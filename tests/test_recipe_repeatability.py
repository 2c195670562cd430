"""For every recipe: the same seed gives the same metrics, and a crash mid-way resumed from the last checkpoint
ends with the same weights and the same logged metrics as the uninterrupted run."""

import csv
import json

import pytest

from recipes.__main__ import main
from tests.conftest import CONFIGS, EXTRA_SMOKE_ARGS, TINY_VAL_AUROC

STEPS, CRASH = 6, 3
# Recipe-specific settings: small batches, and the crash falling mid-interval / mid-schedule of the callbacks
# (``--trainer.callbacks.init_args.X`` addresses the recipe's last callback).
_SMALL_TEXT = ["--data.init_args.batch_size=8", "--data.init_args.synthetic_train_size=200",
               "--model.init_args.exact_match_batches=1", "--model.init_args.max_new_tokens=4"]
RESUME_ARGS: dict[str, list[str]] = {
    "sft": _SMALL_TEXT,
    "pld_pretrain": [*_SMALL_TEXT, "--trainer.callbacks.init_args.warmup_steps=0",
                     "--trainer.callbacks.init_args.gamma=0.5"],
    "lisa_sft": [*_SMALL_TEXT, "--trainer.callbacks.init_args.interval=2"],  # crash at step 3: mid-interval
    "badam_sft": [*_SMALL_TEXT, "--trainer.callbacks.init_args.interval=2",  # crash mid-interval, mid-pass
                  "--trainer.callbacks.init_args.order=random"],
    "owlore_sft": [*_SMALL_TEXT, "--trainer.callbacks.init_args.interval=2",
                   "--trainer.callbacks.init_args.calibration_batches=1",
                   "--model.init_args.optimizer.init_args.update_proj_gap=2"],  # projector refreshed around the crash
    # 3 optimizer steps per rollout batch: the crash falls between two rollouts, LLDS is active (mu > 1)
    "grpo_llds": ["--model.init_args.mu=3", "--model.init_args.num_mini_batches=1"],
}


def _run(path, root, crash: bool = False, ckpt: str | None = None) -> dict:
    args = ["fit", "--config", str(path), *EXTRA_SMOKE_ARGS.get(path.stem, []), *RESUME_ARGS.get(path.stem, []),
            f"--trainer.default_root_dir={root}", "--wandb=disabled",
            f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2",
            "--trainer.check_val_every_n_epoch=null", "--trainer.accelerator=cpu", "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0",
            "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={root}/ckpt",
            f"--trainer.callbacks.every_n_train_steps={CRASH}", "--trainer.callbacks.save_top_k=-1",
            "--trainer.callbacks+=tests.probe_callbacks.RankStateDump", f"--trainer.callbacks.out_dir={root}"]
    if crash:
        args += ["--trainer.callbacks+=tests.probe_callbacks.CrashAtStep", f"--trainer.callbacks.step={CRASH}"]
    if ckpt:
        args += ["--ckpt_path", ckpt]
    main(args)
    metrics = sorted(root.rglob("metrics.csv"))[-1].read_text().splitlines()  # the newest version_N
    return {"state": json.loads((root / "rank0.json").read_text()), "metrics": metrics}


@pytest.mark.slow
@TINY_VAL_AUROC
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_same_seed_same_run_and_exact_resume(path, tmp_path, monkeypatch, cli_argv, recwarn):
    monkeypatch.chdir(tmp_path)
    first = _run(path, tmp_path / "first")
    # GRPO optimizes manually: Lightning's notice about step-interval checkpoints is filtered with its reason
    assert not [w for w in recwarn if "manual optimization" in str(w.message)]
    second = _run(path, tmp_path / "second")
    assert first["metrics"] == second["metrics"], "two runs with the same seed logged different metrics"
    assert first["state"] == second["state"]

    with pytest.raises(SystemError, match="simulated crash"):
        _run(path, tmp_path / "crashed", crash=True)
    ckpt = next((tmp_path / "crashed" / "ckpt").glob(f"*step={CRASH}.ckpt"))
    resumed = _run(path, tmp_path / "crashed", ckpt=str(ckpt))
    assert resumed["state"] == first["state"], "resumed run ended with other weights or callback state"
    assert _rows_from(resumed["metrics"], CRASH) == _rows_from(first["metrics"], CRASH)


def _rows_from(lines: list[str], step: int) -> list[dict[str, str]]:
    """The logged values (empty cells dropped) of the metric rows at ``step`` and later."""
    rows = csv.DictReader(lines)
    return [{k: v for k, v in r.items() if v != ""} for r in rows if int(r["step"]) >= step]
