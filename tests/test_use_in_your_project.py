"""docs/use_in_your_project.md: its Python snippets run as written, the `callbacks` name clash behaves as it says,
and the installed entry points (``layerwise``, recipes by name, ``list``) exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

from recipes.__main__ import main
from recipes.cli import CONFIG_DIR, resolve_config, resolve_config_args

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "use_in_your_project.md"


def snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)


def run_snippet(title: str) -> dict:
    code = next(s for s in snippets() if title in s)
    namespace: dict = {"__name__": "snippet"}
    exec(compile(code, f"{PAGE}:{title}", "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


def test_the_page_has_the_three_snippets():
    assert len(snippets()) == 3


def test_lisa_on_a_custom_module_trains_sampled_blocks():
    torch.manual_seed(0)
    ns = run_snippet("class MyLM")
    lisa, module = ns["lisa"], ns["trainer"].lightning_module
    assert ns["trainer"].global_step == 4 and len(lisa.active) == 2
    optimizer = ns["trainer"].optimizers[0]
    held = {id(p) for p in optimizer.state}
    blocks = module.model.model.layers
    inactive = [i for i in range(len(blocks)) if i not in lisa.active]
    # the optimizer holds state only for the active blocks (and the always-on parts), never for frozen ones
    assert all(id(p) not in held for i in inactive for p in blocks[i].parameters())
    assert all(id(p) in held for i in lisa.active for p in blocks[i].parameters())


def test_lisa_on_a_timm_vit():
    ns = run_snippet("class MyViT")
    assert ns["trainer"].global_step == 3


def test_layer_drop_on_gpt2_drops_blocks():
    torch.manual_seed(0)
    ns = run_snippet("class MyGPT2")
    pld = ns["pld"]
    assert ns["trainer"].global_step == 4
    assert pld.step == 3 and min(pld.probs) < 1.0  # drew at every step with a decaying keep ratio


def _project(tmp_path: Path, layout: str) -> tuple[Path, list[str]]:
    train = "from callbacks import LISA\nfrom {mine} import MyCallback\nprint('ours:', LISA.__module__, 'mine:', " \
            "MyCallback.__module__)\n"
    mine = "class MyCallback:\n    pass\n"
    if layout == "flat":
        (tmp_path / "callbacks.py").write_text(mine)
        (tmp_path / "train.py").write_text(train.format(mine="callbacks"))
        return tmp_path, [sys.executable, "train.py"]
    package = tmp_path / "myproject"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "callbacks.py").write_text(mine)
    (package / "train.py").write_text(train.format(mine="myproject.callbacks"))
    return tmp_path, [sys.executable, "-m", "myproject.train"]


def _run(cwd: Path, cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_projects_own_callbacks_py_shadows_ours_and_the_package_layout_avoids_it(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "nested").mkdir()
    flat = _run(*_project(tmp_path / "flat", "flat"))
    assert flat.returncode != 0 and "cannot import name 'LISA' from 'callbacks'" in flat.stderr
    nested = _run(*_project(tmp_path / "nested", "package"))
    assert nested.returncode == 0, nested.stderr
    assert "ours: callbacks.lisa mine: myproject.callbacks" in nested.stdout


def test_console_command_and_recipes_by_name(tmp_path, monkeypatch, capsys):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"layerwise": "recipes.__main__:main"}
    monkeypatch.chdir(tmp_path)
    assert resolve_config("lisa_sft") == str(CONFIG_DIR / "lisa_sft.yaml")
    assert resolve_config("lisa_sft.yaml") == str(CONFIG_DIR / "lisa_sft.yaml")
    (tmp_path / "lisa_sft.yaml").write_text("seed_everything: 1\n")
    assert resolve_config("lisa_sft.yaml") == "lisa_sft.yaml"  # a file of that name wins
    assert resolve_config_args(["fit", "--config=sft", "--config", "nope"]) == \
        ["fit", f"--config={CONFIG_DIR / 'sft.yaml'}", "--config", "nope"]
    main(["list"])
    out = capsys.readouterr().out
    assert str(CONFIG_DIR) in out and "lisa_sft" in out


@pytest.mark.parametrize("name", ["grpo_llds", "lisa_sft"])
def test_print_config_by_name(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["layerwise"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", name, "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path: recipes." in capsys.readouterr().out
