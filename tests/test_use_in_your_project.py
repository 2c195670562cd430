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

from callbacks import LISA
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


@pytest.fixture
def lisa_record(monkeypatch) -> dict:
    """Records what LISA did in a snippet: the weights at fit start and every set of blocks it drew."""
    record: dict = {"draws": []}
    fit_start, switch = LISA.on_fit_start, LISA.switch

    def on_fit_start(self, trainer, pl_module):
        record["start"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        fit_start(self, trainer, pl_module)

    def recording_switch(self, trainer, new_active):
        record["draws"].append(list(new_active))
        switch(self, trainer, new_active)

    monkeypatch.setattr(LISA, "on_fit_start", on_fit_start)
    monkeypatch.setattr(LISA, "switch", recording_switch)
    return record


def assert_lisa_trained_the_drawn_blocks(record: dict, trainer, blocks_prefix: str, n_blocks: int, n_draws: int):
    """Exactly the blocks LISA drew moved; only the blocks active at the end hold optimizer state."""
    assert len(record["draws"]) == n_draws
    drawn = {i for draw in record["draws"] for i in draw}
    module = trainer.lightning_module
    now = module.state_dict()

    def moved(prefix: str) -> bool:
        return any(not torch.equal(now[k], v) for k, v in record["start"].items() if k.startswith(prefix))

    assert {i for i in range(n_blocks) if moved(f"{blocks_prefix}.{i}.")} == drawn
    assert drawn != set(range(n_blocks)), "every block was drawn: the test cannot tell frozen from trained"
    held = {id(p) for p in trainer.optimizers[0].state}
    names = dict(module.named_parameters())
    for i in range(n_blocks):
        params = [p for n, p in names.items() if n.startswith(f"{blocks_prefix}.{i}.")]
        assert params and all((id(p) in held) == (i in record["draws"][-1]) for p in params), f"block {i}"


def test_lisa_on_a_custom_module_trains_sampled_blocks(lisa_record):
    torch.manual_seed(0)
    ns = run_snippet("class MyLM")
    trainer = ns["trainer"]
    assert trainer.global_step == 4 and ns["lisa"].active == lisa_record["draws"][-1]
    assert [len(d) for d in lisa_record["draws"]] == [2, 2]  # n_layers=2, redrawn every 2 of the 4 steps
    assert_lisa_trained_the_drawn_blocks(lisa_record, trainer, "model.model.layers", n_blocks=4, n_draws=2)
    start, now = lisa_record["start"], trainer.lightning_module.state_dict()
    assert not torch.equal(start["model.model.embed_tokens.weight"], now["model.model.embed_tokens.weight"])


def test_lisa_on_a_timm_vit(lisa_record):
    torch.manual_seed(0)
    ns = run_snippet("class MyViT")
    trainer = ns["trainer"]
    assert trainer.global_step == 3
    assert [len(d) for d in lisa_record["draws"]] == [1, 1, 1]  # one block, redrawn every step
    assert_lisa_trained_the_drawn_blocks(lisa_record, trainer, "net.blocks", n_blocks=4, n_draws=3)
    start, now = lisa_record["start"], trainer.lightning_module.state_dict()
    assert not torch.equal(start["net.head.weight"], now["net.head.weight"])


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
    assert resolve_config_args(["fit", "--config=sft", "-c", "lisa_sft", "-c=owlore_sft"]) == \
        ["fit", f"--config={CONFIG_DIR / 'sft.yaml'}", "-c", str(CONFIG_DIR / "lisa_sft.yaml"),
         f"-c={CONFIG_DIR / 'owlore_sft.yaml'}"]
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
