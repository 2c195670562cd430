"""``python -m recipes``: the command table, and the private LightningCLI methods ``RecipesCLI`` overrides (these
tests fail when a Lightning release renames them, changes their signature or stops calling them)."""

from __future__ import annotations

import inspect
import sys
import warnings

import pytest
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel

import recipes.__main__ as entry
from recipes.cli import CONFIG_DIR, RecipesCLI, print_recipes, run_lightning
from recipes.commands import demo, diversity, export, restore

# the private LightningCLI methods RecipesCLI overrides, with the signatures it was written against
OVERRIDDEN = {"_parse_ckpt_path": ["self"], "_run_subcommand": ["self", "subcommand"]}


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_overridden_private_methods_keep_their_lightning_signature(name):
    ours, theirs = inspect.signature(getattr(RecipesCLI, name)), inspect.signature(getattr(LightningCLI, name))
    assert list(theirs.parameters) == OVERRIDDEN[name]
    assert list(ours.parameters) == OVERRIDDEN[name]
    assert getattr(RecipesCLI, name) is not getattr(LightningCLI, name)  # still overridden


def test_lightning_cli_calls_the_overridden_methods(tmp_path, cli_argv):
    calls = []

    class Recording(LightningCLI):
        def _parse_ckpt_path(self) -> None:
            calls.append(("_parse_ckpt_path", self.config["subcommand"]))

        def _run_subcommand(self, subcommand: str) -> None:
            calls.append(("_run_subcommand", subcommand))  # nothing is trained

    Recording(BoringModel, args=["fit", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"],
              save_config_callback=None, seed_everything_default=0)
    assert calls == [("_parse_ckpt_path", "fit"), ("_run_subcommand", "fit")]


def test_given_args_are_the_whole_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipes", "demo", "--trainer.max_steps=99"])  # what `demo` leaves there
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = RecipesCLI(args=["--config", str(CONFIG_DIR / "sft.yaml"), "--wandb=disabled", "--trainer.max_steps=3",
                               f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert cli.trainer.max_steps == 3
    assert not [w for w in caught if "args parameter" in str(w.message)]


def test_every_command_has_one_function():
    table = entry.COMMANDS
    assert sorted(table) == ["demo", "diversity", "export", "fit", "list", "restore", "test", "validate"]
    assert (table["demo"], table["export"], table["restore"], table["diversity"], table["list"]) == (
        demo.run_demo, export.main, restore.main, diversity.main, print_recipes)
    for name in ("fit", "validate", "test"):
        assert table[name].func is run_lightning and table[name].args == (name,)


def test_main_dispatches_on_the_first_word(monkeypatch):
    seen = []
    monkeypatch.setitem(entry.COMMANDS, "export", seen.append)
    monkeypatch.setattr(entry, "run_lightning", lambda sub, argv: seen.append((sub, argv)))
    entry.main(["export", "--out", "x"])
    entry.main(["--help"])  # not a command: LightningCLI's own help
    assert seen == [["--out", "x"], (None, ["--help"])]


def test_list_prints_every_recipe(capsys):
    entry.main(["list"])
    out = capsys.readouterr().out
    assert all(f"{p.stem} " in out for p in CONFIG_DIR.glob("*.yaml"))
