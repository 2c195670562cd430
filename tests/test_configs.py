"""Every recipe YAML parses, documents every setting in a comment, and smoke-runs `fit` for a couple of batches."""

import importlib
import re
from pathlib import Path

import pytest
import yaml

from recipes.__main__ import main
from recipes.cli import RecipesCLI, recipe_summaries
from tests.conftest import CONFIGS, EXTRA_SMOKE_ARGS, SMOKE_ARGS, TINY_VAL_AUROC

_KEY = re.compile(r"^(?P<indent>\s*)(?:- )?(?P<key>[A-Za-z_][\w.]*):(?P<value>[^#]*)(?P<comment>#.*)?$")
# section and class keys, self-explanatory in a Lightning CLI config
_STRUCTURE = {"trainer", "model", "data", "init_args", "callbacks", "class_path", "optimizer"}


def import_object(class_path: str) -> type:
    """The class a YAML's ``class_path`` names (``recipes.CausalLMModule``)."""
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def undocumented_keys(text: str) -> list[str]:
    """Settings with no comment: none at the end of the line, none on the line above, none on a parent key."""
    lines = text.splitlines()
    parents: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    missing = []
    for i, line in enumerate(lines):
        m = _KEY.match(line)
        if not m:
            continue
        indent = len(m["indent"]) + (2 if line.lstrip().startswith("- ") else 0)
        while parents and parents[-1][0] >= indent:
            parents.pop()
        documented = bool(m["comment"]) or (i > 0 and lines[i - 1].strip().startswith("#"))
        if not documented and not any(doc for _, doc in parents) and m["key"] not in _STRUCTURE:
            missing.append(f"line {i + 1}: {line.strip()}")
        parents.append((indent, documented))
    return missing


def test_undocumented_keys_are_found():
    text = "trainer:\n  devices: 1\n  max_steps: 5  # steps\nmodel:\n  cfg:  # block comment\n    width: 3\n"
    assert undocumented_keys(text) == ["line 2: devices: 1"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_yaml_parses_and_every_key_is_commented(path: Path, cli_argv):
    text = path.read_text()
    assert text.startswith("# "), f"{path.name}: first line must be a '# ' one-line description"
    config = yaml.safe_load(text)
    assert {"model", "data", "trainer"} <= config.keys()
    assert undocumented_keys(text) == [], f"{path.name}: settings without a comment"
    cli = RecipesCLI(args=["--config", str(path), "--wandb=disabled"], run=False)
    # the CLI builds the classes the YAML names, with its trainer settings
    assert type(cli.model) is import_object(config["model"]["class_path"])
    assert type(cli.datamodule) is import_object(config["data"]["class_path"])
    assert cli.trainer.max_steps == config["trainer"].get("max_steps", -1)
    assert cli.trainer.precision == config["trainer"].get("precision", "32-true")


# a one-batch validation of the X-ray recipes has labels without positives: the recipe says so, as it should


@TINY_VAL_AUROC
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_smoke_runs(path: Path, tmp_path, monkeypatch, cli_argv):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path / 'runs'}", *SMOKE_ARGS,
            *EXTRA_SMOKE_ARGS.get(path.stem, [])]
    main(args)
    metrics = list((tmp_path / "runs").rglob("metrics.csv"))
    assert metrics, "no CSV metrics written"
    header = metrics[0].read_text().splitlines()[0].split(",")
    named = [h for h in header if h not in ("epoch", "step")]
    assert named and all("/" in h for h in named), f"metric names must be <area>/<metric>: {named}"
    assert any(h.startswith("optim/lr") for h in named), f"no learning rate logged: {named}"


def test_list_prints_every_recipe(capsys):
    main(["list"])
    out = capsys.readouterr().out
    for name, line in recipe_summaries().items():
        assert name in out and line in out
