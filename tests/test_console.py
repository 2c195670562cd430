"""What a user sees: the progress bar, the learning rates in the logs, a log folder W&B has written to first, and
the parser naming a mistaken command line or config file before anything is trained."""

import re
import warnings
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar, TQDMProgressBar

from callbacks.run.progress import StepProgressBar
from recipes.__main__ import main
from recipes.cli import CONFIG_DIR, RecipesCLI
from recipes.parts.loggers import default_loggers


def describe(max_epochs, max_steps, global_step=7, epoch=3) -> str:
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs, max_steps=max_steps, global_step=global_step)
    return bar._get_train_description(epoch).strip()


def test_progress_bar_shows_the_budget_that_bounds_the_run():
    assert describe(max_epochs=-1, max_steps=2000) == "Epoch 3 · step 7/2000"  # not "Epoch 3/-2"
    assert describe(max_epochs=30, max_steps=-1) == "Epoch 3/29"
    assert describe(max_epochs=None, max_steps=-1) == "Epoch 3"


def test_csv_run_folder_exists_before_wandb_writes_into_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    csv, wandb = default_loggers(tmp_path, "run", wandb="offline")
    (tmp_path / "run" / "version_0" / "wandb").mkdir()  # what W&B's first write leaves in the run folder
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Lightning's "directory exists and is not empty"
        csv.log_metrics({"train/loss": 1.0}, step=0)
        csv.save()
    assert wandb.save_dir == csv.log_dir
    assert (tmp_path / "run" / "version_0" / "metrics.csv").read_text().startswith("step,train/loss")


def _callbacks(tmp_path, *args) -> list:
    cli = RecipesCLI(args=["--config", str(CONFIG_DIR / "sft.yaml"), "--wandb=disabled",
                           f"--trainer.default_root_dir={tmp_path}", *args], run=False)
    return cli.trainer.callbacks


def test_cli_adds_lr_monitor_and_step_bar_unless_they_cannot_work(tmp_path, cli_argv):
    default = _callbacks(tmp_path)
    assert sum(isinstance(c, LearningRateMonitor) for c in default) == 1
    assert [type(c) for c in default if isinstance(c, ProgressBar)] == [StepProgressBar]
    quiet = _callbacks(tmp_path, "--trainer.logger=false", "--trainer.enable_progress_bar=false")
    assert not any(isinstance(c, (LearningRateMonitor, ProgressBar)) for c in quiet)
    own = _callbacks(tmp_path, "--trainer.callbacks+=TQDMProgressBar")
    assert [type(c) for c in own if isinstance(c, ProgressBar)] == [TQDMProgressBar]


CONFIG_MISTAKES = {  # a mistaken command line stops the parser, naming the mistake
    "misspelled_trainer_key": (["--trainer.max_step=3"], r"max_step"),
    "misspelled_model_key": (["--model.init_args.warmup_step=3"], r"warmup_step"),
    "unknown_class_path": (["--model.class_path=recipes.CausalLMModul"], r"CausalLMModul"),
    "wrong_value_type": (["--data.init_args.batch_size=many"], r"batch_size"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_MISTAKES))
def test_config_mistakes(case, tmp_path, capsys, monkeypatch, cli_argv):
    monkeypatch.chdir(tmp_path)
    args, pattern = CONFIG_MISTAKES[case]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG_DIR / "sft.yaml"), "--wandb=disabled", *args])
    assert exit_info.value.code != 0
    assert re.search(pattern, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists(), "nothing may be trained or logged"


def test_yaml_file_with_misspelled_key(tmp_path, capsys, monkeypatch, cli_argv):
    monkeypatch.chdir(tmp_path)
    text = (CONFIG_DIR / "sft.yaml").read_text().replace("  max_steps:", "  max_stepz:")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "bad.yaml"), "--wandb=disabled"])
    assert "max_stepz" in capsys.readouterr().err
