"""The docs' reference tables stay whole: one "settings for a real 7B model" section per technique page, which
docs/real_scale.md links to instead of repeating, and a README layout table that names every exported callback
and every command."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import callbacks

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SETTINGS = "## Settings for a real 7B model"
TECHNIQUE_PAGES = ["layer_sampling.md", "badam.md", "layer_drop.md", "grpo_llds.md", "layer_diagnostics.md",
                   "layer_restoration.md"]
COMMANDS = ["fit", "validate", "test", "list", "demo", "export", "restore", "diversity"]


def section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split()[0]
    start = text.index(heading)
    following = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(heading):], flags=re.M)
    return text[start:start + len(heading) + following.start()] if following else text[start:]


@pytest.mark.parametrize("page", TECHNIQUE_PAGES)
def test_each_technique_page_has_one_7b_settings_section(page):
    text = (DOCS / page).read_text()
    assert text.count(SETTINGS) == 1, f"{page}: expected one '{SETTINGS}' section"
    assert re.search(r"^(\| `|- )", section(text, SETTINGS), flags=re.M), f"{page}: the section has no settings"


def test_real_scale_links_to_the_technique_tables_instead_of_repeating_them():
    text = (DOCS / "real_scale.md").read_text()
    for page in TECHNIQUE_PAGES:
        assert f"({page}#settings-for-a-real-7b-model)" in text, page
    assert SETTINGS not in text
    assert not re.search(r"^\| `trainer\.precision` \|", text, flags=re.M), "a settings table belongs on its page"
    others = [p.name for p in sorted(DOCS.glob("*.md")) if p.name not in TECHNIQUE_PAGES]
    assert [p for p in others if SETTINGS in (DOCS / p).read_text()] == []


def test_the_readme_layout_names_every_callback_and_command():
    layout = section((ROOT / "README.md").read_text(), "## Layout")
    missing = [name for name in callbacks.__all__ if f"`{name}`" not in layout]
    assert not missing, f"README layout table does not name: {missing}"
    main_row = next(line for line in layout.splitlines() if line.startswith("| `recipes/__main__.py` |"))
    assert [c for c in COMMANDS if f"`{c}`" not in main_row] == []


PACKAGES = sorted(p.parent for top in ("callbacks", "datamodules", "recipes")
                  for p in (ROOT / top).rglob("__init__.py"))


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_package_docstring_lists_its_modules(package):
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    names = sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")
    names += sorted(p.name for p in package.iterdir() if (p / "__init__.py").is_file())
    missing = [n for n in names if f"``{n}``" not in doc]
    assert not missing, f"{package.relative_to(ROOT)}/__init__.py's docstring does not list {missing}"
