"""The resume rule covers the whole run: a different training method is refused naming it, every other change of
the trainer, the seed and the callbacks is listed (and applied)."""

import logging
import warnings

import pytest
import torch

from recipes.__main__ import main
from recipes.cli import CONFIG_DIR
from recipes.resume import CheckpointError
from recipes.resume_rule import compare_callbacks, compare_run
from tests.conftest import SMOKE_ARGS

LISA = {"class_path": "callbacks.LISA", "init_args": {"n_layers": 2, "interval": 20, "sampling": "uniform"}}
DIAG = {"class_path": "callbacks.LayerDiagnostics", "init_args": {"interval": 50}}


def test_a_method_change_is_refused_and_its_settings_and_other_callbacks_are_listed():
    refused, listed = compare_callbacks([DIAG, LISA], [{**LISA, "init_args": {"n_layers": 3, "interval": 10,
                                                                            "sampling": "importance"}}])
    assert refused == []
    assert listed == ["trainer.callbacks: callbacks.LayerDiagnostics is no longer given",
                      "trainer.callbacks.LISA.interval: checkpoint 20, now 10",
                      "trainer.callbacks.LISA.n_layers: checkpoint 2, now 3",
                      "trainer.callbacks.LISA.sampling: checkpoint 'uniform', now 'importance'"]
    refused, _ = compare_callbacks([LISA], [{"class_path": "callbacks.OwLore", "init_args": {}}])
    assert refused == ["trainer.callbacks (the training method): checkpoint ['LISA'], now ['OwLore']"]
    refused, listed = compare_callbacks([], [DIAG])
    assert refused == [] and listed == ["trainer.callbacks: callbacks.LayerDiagnostics is added"]


def test_a_checkpoint_without_a_saved_config_is_checked_by_its_callback_states():
    ckpt = {"callbacks": {"LISA": {"active": [0]}, "ExactResume": {}}}
    refused, _ = compare_run(ckpt, {"trainer": {"callbacks": [{"class_path": "callbacks.BAdam"}]}})
    assert refused == ["trainer.callbacks (the training method): checkpoint ['LISA'], now ['BAdam']"]
    assert compare_run(ckpt, {"trainer": {"callbacks": [LISA]}}) == ([], [])


def _fit(root, *args, config="sft.yaml"):
    main(["fit", "--config", str(CONFIG_DIR / config), f"--trainer.default_root_dir={root}", *SMOKE_ARGS,
          "--data.init_args.synthetic_train_size=32", "--data.init_args.batch_size=4", "--run_name=sft", *args])


def test_cli_resume_lists_trainer_seed_changes_and_refuses_another_recipe(tmp_path, monkeypatch, cli_argv, caplog):
    monkeypatch.chdir(tmp_path)
    _fit(tmp_path, "--seed_everything=1")
    saved = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)
    assert "seed_everything: 1" in saved["callbacks"]["RunConfigSaver"]["config"]  # the run's config travels along

    with pytest.raises(CheckpointError, match=r"training method\): checkpoint none, now \['OwLore'\]"):
        _fit(tmp_path, "--ckpt_path=last", config="owlore_sft.yaml")  # SFT into OwLore: the recipes differ

    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _fit(tmp_path, "--ckpt_path=last", "--seed_everything=2", "--trainer.max_steps=3",
             "--trainer.limit_train_batches=3", "--trainer.accumulate_grad_batches=2",
             "--trainer.gradient_clip_val=0.5")
    assert ("Resuming with settings changed since the checkpoint (the values given now are used):\n"
            "  trainer.accumulate_grad_batches: checkpoint 1, now 2\n"
            "  trainer.gradient_clip_val: checkpoint 1.0, now 0.5\n"
            "  trainer.limit_train_batches: checkpoint 2, now 3\n"
            "  trainer.max_steps: checkpoint 2, now 3\n"
            "  seed_everything: checkpoint 1, now 2\n") in caplog.text  # all of it, and nothing else
    assert not [w for w in seen if "not resumable" in str(w.message)]  # Lightning's: our samplers do resume
