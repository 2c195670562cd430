"""Every shell command and Python snippet shown in README.md and docs/*.md runs, shortened, so a documented command
cannot silently break.

The ```bash / ```sh / ```console blocks of each page are parsed (backslash continuations joined, ``$`` prompts and
``#`` comments removed) and run in order in one scratch folder per page (later commands use what earlier ones
wrote, e.g. ``$(ls runs/sft/version_0/checkpoints/*.ckpt)``). How each command is run is decided by RULES, in
order; a command no rule covers fails the test, so a new kind of command needs a rule here. Each ```python block
runs as written, in its place among the page's commands and in the same folder (the export page's snippet loads
the folder its commands exported). The metric names the pages mention are then checked against what those runs
logged.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from recipes.__main__ import main
from recipes.cli import ConfigNotFound, resolve_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = ("recipes", "callbacks", "datamodules", "benchmarks", "pyproject.toml", "Makefile")

# Appended to a `python -m recipes fit|validate|test` command unless the command sets the key itself.
TRAINER_LIMITS = {"--trainer.max_steps": "2", "--trainer.limit_train_batches": "2", "--trainer.limit_val_batches": "1",
                  "--trainer.limit_test_batches": "1", "--trainer.val_check_interval": "1",
                  "--trainer.check_val_every_n_epoch": "null", "--trainer.num_sanity_val_steps": "0",
                  "--trainer.log_every_n_steps": "1", "--last_ckpt_every_steps": "1"}
SMALL_DATA = {  # by data module: the same small data for every command of a page, so checkpoints fit
    "datamodules.InstructionDataModule": {"--data.init_args.synthetic_train_size": "100"},
    "datamodules.TextCorpusDataModule": {"--data.init_args.synthetic_train_size": "100"},
    "datamodules.VerifiableQADataModule": {"--data.init_args.synthetic_sft_size": "64",
                                           "--data.init_args.synthetic_train_size": "64",
                                           "--data.init_args.synthetic_val_size": "8"},
    "datamodules.ChestXray14DataModule": {"--data.init_args.phantom_patients": "24",
                                          "--data.init_args.phantom_image_size": "64"},
    "datamodules.CheXpertDataModule": {"--data.init_args.phantom_patients": "24",
                                       "--data.init_args.phantom_image_size": "64"},
}
SMALL_MODEL = {"recipes.GRPOModule": {"--model.init_args.sft_steps": "2"}}


@dataclass
class Command:
    page: str
    line: int
    text: str
    rule: str = ""
    argv: list[str] = field(default_factory=list)


def code_blocks(page: Path) -> list[tuple[int, str, str]]:
    """``(first line, language, text)`` of each shell and Python block of ``page``, in page order."""
    text = page.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1), m.group(2))
            for m in re.finditer(r"^```(bash|sh|console|python)[ \t]*\n(.*?)^```", text, flags=re.S | re.M)]


# pages whose Python snippets a test of their own runs and checks in more detail
PYTHON_TESTED_ELSEWHERE = {"use_in_your_project.md": "tests/test_use_in_your_project.py"}


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` outside quotes, after whitespace)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def page_commands(page: Path) -> list[Command]:
    out = []
    for start, language, block in code_blocks(page):
        if language == "python":
            skip = PYTHON_TESTED_ELSEWHERE.get(page.name)
            out.append(Command(page.name, start, block, f"skipped: run by {skip}" if skip else "python snippet"))
            continue
        pending, first = "", start
        for offset, raw in enumerate(block.splitlines()):
            line = raw.strip()
            if not pending:
                first = start + offset
                line = line.removeprefix("$ ")
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            text = strip_comment(pending + line).strip()
            pending = ""
            if text:
                out.append(Command(page.name, first, text))
    return out


# ------------------------------------------------------------------------------------------------------ rules
def _words(text: str) -> list[str]:
    return shlex.split(text, comments=False)


def _recipe_classes(argv: list[str]) -> tuple[str | None, str | None]:
    """The model and data class paths of the ``--config`` a recipes command names."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.removeprefix("--config=") \
            if arg.startswith("--config=") else None
        try:
            path = Path(resolve_config(value)) if value else None
        except ConfigNotFound:  # a file an earlier command of the page writes
            path = None
        if path is not None and path.is_file():
            config = yaml.safe_load(path.read_text())
            return config.get("model", {}).get("class_path"), config.get("data", {}).get("class_path")
    return None, None


def _append_missing(argv: list[str], limits: dict[str, str]) -> list[str]:
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    given |= {a.replace(".init_args", "") for a in given}
    extra = []
    for key, value in limits.items():
        if key not in given and key.replace(".init_args", "") not in given:
            extra += [key, value]
    return argv + extra


def recipes_args(argv: list[str]) -> tuple[str, list[str]]:
    """How a ``python -m recipes ...`` argument list is run: as given, shortened, or parse-checked only."""
    sub = argv[0] if argv else ""
    if sub in ("list", "export") or "--print_config" in argv or "--help" in argv:
        return "as documented", argv
    if sub == "demo":
        return "demo, shortened", _append_missing(argv, {**TRAINER_LIMITS, **SMALL_DATA[
            "datamodules.InstructionDataModule"]})
    if sub not in ("fit", "validate", "test"):
        raise LookupError(f"no rule for `recipes {sub}`")
    values = [a.split("=", 1)[-1] for a in argv]  # --key=/path as well as a bare /path
    missing = [v for v in values if v.startswith("/") and not Path(v).exists() and not v.startswith("/tmp")]
    if missing:  # real data sets and models are not on this machine: check that every option parses
        return f"options parsed only ({missing[0]} is not here)", [*argv, "--print_config"]
    model, data = _recipe_classes(argv)
    limits = {**TRAINER_LIMITS, **SMALL_MODEL.get(model, {}), **SMALL_DATA.get(data, {})}
    return f"{sub}, shortened", _append_missing(argv, limits)


SKIPPED = {  # first words -> why the command is not run here
    ("make", "test"): "the test suite itself",
    ("make", "lint"): "ruff runs on its own in CI",
    ("make", "install"): "installs into .venv (done by the test environment)",
    ("pip", "install"): "installs packages (network)",
    ("python", "-m", "pip"): "installs packages (network)",
    ("wandb", "sync"): "uploads to W&B (network)",
    ("git", "clone"): "network",
}
PYTHONS = ("python", "python3", ".venv/bin/python")


def classify(command: Command, cwd: Path) -> Command:
    """Fill in ``rule`` and ``argv`` (after shell expansion in ``cwd``), or raise ``LookupError``."""
    if command.rule:  # a Python snippet: run as written
        return command
    words = _words(command.text)
    for prefix, why in SKIPPED.items():
        if tuple(words[:len(prefix)]) == prefix:
            command.rule = f"skipped: {why}"
            return command
    if words[:2] == ["make", "demo"]:
        words = ["python", "-m", "recipes", "demo", *words[2:]]
    if words[0] == "srun":  # SLURM's launcher starts the command as it is
        words = words[1:]
    if words[0] == "layerwise":  # the console command is recipes.__main__:main, the same as python -m recipes
        words = ["python", "-m", "recipes", *words[1:]]
    if words[0] not in PYTHONS:
        raise LookupError(f"no rule for {words[0]!r}")
    expanded = expand(" ".join(shlex.quote(w) if "$(" not in w else f'"{w}"' for w in words[1:]), cwd)
    if expanded[:2] == ["-m", "recipes"]:
        command.rule, command.argv = recipes_args(expanded[2:])
        command.argv = ["-m", "recipes", *command.argv]
    elif expanded and expanded[0].startswith("benchmarks/"):
        command.rule, command.argv = "benchmark: its --help only (a run takes minutes)", [expanded[0], "--help"]
    elif expanded[:1] == ["-c"]:
        command.rule, command.argv = "as documented", expanded
    else:
        raise LookupError(f"no rule for python {' '.join(expanded[:2])}")
    return command


def expand(text: str, cwd: Path) -> list[str]:
    """Shell expansion (``$(...)``, globs, quotes) of ``text`` in ``cwd``, as bash would do it."""
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {text}"], cwd=cwd, capture_output=True, text=True,
                         check=True)
    return out.stdout.split("\0")[:-1]


# ---------------------------------------------------------------------------------------------------- running
def run(command: Command, cwd: Path, monkeypatch) -> str | None:
    """Run one classified command; returns an error text, or None."""
    if command.rule.startswith("skipped"):
        return None
    if command.rule == "python snippet":
        monkeypatch.chdir(cwd)
        try:
            exec(compile(command.text, f"{command.page}:{command.line}", "exec"), {"__name__": "__main__"})
        except Exception as err:  # noqa: BLE001 - reported with the snippet
            return f"{type(err).__name__}: {err}"
        return None
    if command.argv[:2] == ["-m", "recipes"]:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["recipes"])
        try:
            with warnings.catch_warnings():
                # shortened X-ray runs validate on a few images, so some labels have no positive: the recipe says so
                warnings.filterwarnings("ignore", message=".*AUROC undefined")
                main(command.argv[2:])
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                return f"exited with {exit_.code}"
        except Exception as err:  # noqa: BLE001 - reported with the command
            return f"{type(err).__name__}: {err}"
        return None
    proc = subprocess.run([sys.executable, *command.argv], cwd=cwd, capture_output=True, text=True, timeout=300)
    return None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-2000:]}"


@pytest.fixture(scope="module")
def documented_runs(tmp_path_factory, request) -> dict[str, tuple[Path, list[Command], list[str]]]:
    """Every page's commands run in its own scratch folder: ``{page: (folder, commands, failures)}``."""
    monkeypatch = pytest.MonkeyPatch()
    request.addfinalizer(monkeypatch.undo)
    results = {}
    shared_data = tmp_path_factory.mktemp("data")  # generated data sets are the same for every page: made once
    times = tmp_path_factory.getbasetemp() / "documented_command_seconds.txt"
    for page in PAGES:
        cwd = tmp_path_factory.mktemp(page.stem)
        for name in LINKED:
            (cwd / name).symlink_to(ROOT / name)
        (cwd / "data").symlink_to(shared_data)
        commands, failures = [], []
        for command in page_commands(page):
            where = f"{page.name}:{command.line}: {command.text.splitlines()[0]}"
            try:
                classify(command, cwd)
            except LookupError as err:
                failures.append(f"{where}\n  {err}: add a rule to tests/test_documented_commands.py")
                continue
            except subprocess.CalledProcessError as err:
                failures.append(f"{where}\n  shell expansion failed: {err.stderr}")
                continue
            start = time.perf_counter()
            error = run(command, cwd, monkeypatch)
            with times.open("a") as f:
                f.write(f"{time.perf_counter() - start:6.1f} s  {where[:150]}\n")
            commands.append(command)
            if error:
                failures.append(f"{where}\n  run as {command.rule}: {error}")
        results[page.name] = (cwd, commands, failures)
    return results


# Under `make test` (pytest-xdist, --dist loadgroup) the tests that share the module's runs stay on one worker,
# so the runs happen once.
@pytest.mark.slow
@pytest.mark.xdist_group("documented_runs")
@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_documented_commands_run(page, documented_runs):
    _, commands, failures = documented_runs[page]
    assert not failures, "\n".join(failures)


METRIC = re.compile(r"`((?:train|val|test|optim|lisa|owlore|pld|grpo|loss|llds|mae|badam)/[\w<>{}/.-]+)`")


def documented_metrics() -> dict[str, str]:
    """``{metric name or pattern: page}`` for every `<area>/<name>` in backticks."""
    return {m: page.name for page in PAGES for m in METRIC.findall(page.read_text())}


def shape(name: str) -> str:
    """A metric name with its placeholders (``<i>`` in docs, ``{i}`` in f-strings) as ``*``."""
    return re.sub(r"<[^>]+>|\{[^}]*\}", "*", name)


def logged_names(folders: list[Path]) -> tuple[set[str], set[str]]:
    """Column names of every metrics.csv under ``folders``, and the shapes of the metric-name literals in the code
    (names logged only in some settings, e.g. ``grpo/kl`` with ``kl_coef > 0``, or only to W&B)."""
    logged = set()
    for folder in folders:
        for csv in folder.rglob("metrics.csv"):
            logged |= set(csv.read_text().splitlines()[0].split(","))
    in_code = set()
    for source in [*ROOT.glob("recipes/**/*.py"), *ROOT.glob("callbacks/**/*.py")]:
        in_code |= {shape(n) for n in re.findall(r'f?"(' + METRIC.pattern[2:-2] + r')"', source.read_text())}
    return logged, in_code


@pytest.mark.slow
@pytest.mark.xdist_group("documented_runs")
def test_documented_metric_names_are_logged(documented_runs):
    logged, in_code = logged_names([folder for folder, _, _ in documented_runs.values()])
    missing = []
    for metric, page in documented_metrics().items():
        pattern = re.compile("[^/,]+".join(re.escape(part) for part in re.split(r"<[^>]+>", metric)) + "$")
        if not any(pattern.match(name) for name in logged) and shape(metric) not in in_code:
            missing.append(f"{page}: `{metric}`")
    assert not missing, "documented but never logged:\n" + "\n".join(missing)


def test_parser_joins_continuations_and_drops_comments(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("x\n```bash\n$ python -m recipes fit --config a.yaml \\\n  --x \"$(ls b | tail -1)\"  # note\n"
                    "# a comment line\nmake test   # the suite\n```\n```python\nprint(1)\n```\n")
    commands = page_commands(page)
    assert [(c.line, c.text) for c in commands] == [
        (3, 'python -m recipes fit --config a.yaml --x "$(ls b | tail -1)"'), (6, "make test"), (9, "print(1)\n")]
    assert classify(commands[2], tmp_path).rule == "python snippet"
    assert classify(commands[1], tmp_path).rule.startswith("skipped")
    with pytest.raises(LookupError, match="no rule for 'rm'"):
        classify(Command("p.md", 1, "rm -rf runs"), tmp_path)
