"""Record benchmark runs and generate ``benchmarks/RESULTS.md`` from them: figures are never typed by hand.

Every benchmark prints its figures as one JSON line (the last line of its output). ``run`` executes a benchmark,
appends that line, with the command, date and machine, to ``benchmarks/results/<name>.jsonl`` and regenerates
``RESULTS.md``; ``record`` appends a line of figures measured some other way (the test suite's run time);
``render`` only regenerates. Regenerating also rewrites the generated blocks of the README and ``docs/*.md``
(between ``<!-- results: NAME -->`` and ``<!-- /results -->``), so the figures the docs quote cannot drift.

    python benchmarks/results.py run layer_drop_speed --quick
    python benchmarks/results.py record test_suite passed=812 seconds=480 --command "make test"
    python benchmarks/results.py render
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
DOCS_ROOT = HERE.parent  # the README and docs/*.md, whose generated blocks render() rewrites
WIDE = 8  # a run with more figures than this is shown as a key/value table instead of one row
# What a recorded result is, for results that are not a benchmark script with a docstring.
DESCRIPTIONS = {"test_suite": "The whole test suite, `make test` (pytest-xdist, up to 4 processes): tests passed "
                              "and wall-clock seconds. Recorded after a full run with `python benchmarks/results.py "
                              "record test_suite passed=N seconds=S --command \"make test\"`."}


def machine() -> str:
    """What ran the benchmark: the CUDA device when there is one, else the CPU and its core count."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def last_json_line(output: str) -> dict:
    """The last line of ``output`` that parses as a JSON object."""
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("the benchmark printed no JSON line; its output ends with:\n" + output[-2000:])


def run(name: str, args: list[str]) -> dict:
    """Run ``benchmarks/<name>.py args``, record its JSON line and regenerate RESULTS.md."""
    script = HERE / f"{name}.py"
    if not script.is_file():
        known = sorted(p.stem for p in HERE.glob("*.py") if p.stem != "results")
        raise SystemExit(f"no benchmark {name!r} in {HERE}; known: {', '.join(known)}")
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode:
        raise SystemExit(f"{script.name} exited with status {proc.returncode}; nothing recorded")
    record = {"_command": " ".join(["python", f"benchmarks/{script.name}", *args]),
              "_date": datetime.date.today().isoformat(), "_machine": machine(), **last_json_line(proc.stdout)}
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(RESULTS_DIR / f"{name}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    render()
    return record


def record(name: str, figures: dict, command: str, note: str = "") -> dict:
    """Append figures measured outside a benchmark script (e.g. the test suite's run time) and regenerate."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise SystemExit(f"a result name is lower-case letters, digits and '_', got {name!r}")
    if not figures:
        raise SystemExit("nothing to record: give figures as key=value")
    entry = {"_command": command, "_date": datetime.date.today().isoformat(), "_machine": machine(),
             **({"_note": note} if note else {}), **figures}
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(RESULTS_DIR / f"{name}.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    render()
    return entry


def parse_figures(pairs: list[str]) -> dict:
    """``["passed=812", "seconds=480.5"]`` -> ``{"passed": 812, "seconds": 480.5}`` (values parsed as JSON)."""
    figures = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"figures are key=value, got {pair!r}")
        try:
            figures[key] = json.loads(value)
        except json.JSONDecodeError:
            figures[key] = value
    return figures


def flatten(record: dict, prefix: str = "") -> dict:
    """Nested dicts become dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def cell(value) -> str:
    """A table cell: floats to 4 significant digits, long lists shortened."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        shown = ", ".join(cell(v) for v in value[:6])
        return f"[{shown}{', ...' if len(value) > 6 else ''}]"
    return str(value).replace("|", "\\|").replace("\n", " ")


def describe(name: str) -> str:
    """The first paragraph of the benchmark's module docstring, when the benchmark script exists."""
    script = HERE / f"{name}.py"
    if not script.is_file():
        return DESCRIPTIONS.get(name, "")
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def section(name: str, records: list[dict]) -> list[str]:
    """One benchmark's heading, description and its runs as a table (or key/value tables when wide)."""
    lines = [f"## {name}", ""]
    if text := describe(name):
        lines += [text, ""]
    if name == "gpu_check":
        return lines + gpu_check_tables(records)
    rows = [flatten(r) for r in records]
    meta = [{k: r.pop(k) for k in list(r) if k.startswith("_")} for r in rows]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    if len(keys) <= WIDE:
        lines += ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for i, row in enumerate(rows, 1):
            lines.append(f"| {i} | " + " | ".join(cell(row.get(k, "")) for k in keys) + " |")
        lines.append("")
    else:
        for i, row in enumerate(rows, 1):
            lines += [f"Run {i}:", "", "| figure | value |", "|---|---|"]
            lines += [f"| {k} | {cell(v)} |" for k, v in row.items()] + [""]
    lines += ["Runs: " + "; ".join(f"{i}. {run_line(m)}" for i, m in enumerate(meta, 1)), ""]
    return lines


def run_line(meta: dict) -> str:
    """How a run was made: its command, machine and date, and its note if it has one."""
    note = f" ({meta['_note']})" if meta.get("_note") else ""
    return f"`{meta.get('_command', '?')}` on {meta.get('_machine', '?')}, {meta.get('_date', '?')}{note}"


def load_gpu_check():
    """``benchmarks/gpu_check.py`` as a module (its ``summary_table`` renders a run's headline figures)."""
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parent / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


def gpu_check_tables(records: list[dict]) -> list[str]:
    """One headline table per ``gpu_check.py`` run (its checks share a command and date); raw figures stay in
    ``results/gpu_check.jsonl``."""
    gpu_check = load_gpu_check()
    runs: dict[tuple, list[dict]] = {}
    for record in records:
        runs.setdefault((record.get("_command"), record.get("_date")), []).append(record)
    lines = []
    for i, checks in enumerate(runs.values(), 1):
        lines += [f"Run {i}: {run_line(checks[0])}", "", gpu_check.summary_table({r["check"]: r for r in checks}), ""]
    return lines


BLOCK = re.compile(r"(?P<open><!-- results: (?P<name>[a-z0-9_]+) -->)\n(?P<body>.*?)(?P<close><!-- /results -->)", re.S)
# GPU runs of single benchmarks that the docs quote beside gpu_check: the figures shown for each
GPU_RUN_FIGURES = {
    "layer_drop_speed": ["batch_size", "fused_adamw", "step_s_baseline", "step_s_pld", "ratio", "expected_ratio"],
    "mae_speed": ["batch", "mae_step_s", "full_token_step_s", "time_ratio", "counted_flop_ratio", "mae_images_per_s",
                  "finetune_images_per_s"],
}


def figure_table(runs: list[dict], keys: list[str]) -> list[str]:
    """Chosen figures of several runs, one row each, and how each run was made."""
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for i, run_record in enumerate(runs, 1):
        flat = flatten(run_record)
        lines.append(f"| {i} | " + " | ".join(cell(flat.get(k, "")) for k in keys) + " |")
    return lines + ["", "Runs: " + "; ".join(f"{i}. {run_line(r)}" for i, r in enumerate(runs, 1))]


def gpu_check_block(records: dict[str, list[dict]]) -> str:
    """docs/real_scale.md's figures: the latest GPU run of gpu_check.py, then the single benchmarks' GPU runs."""
    runs: dict[tuple, list[dict]] = {}
    for check in records.get("gpu_check", []):
        if "--cpu-smoke" not in check.get("_command", ""):
            runs.setdefault((check.get("_command"), check.get("_date")), []).append(check)
    if not runs:
        return "No GPU run of `benchmarks/gpu_check.py` is recorded yet."
    checks = list(runs.values())[-1]
    seconds = sum(c.get("wall_s", 0) for c in checks)
    lines = [f"The latest GPU run of `gpu_check.py`: {run_line(checks[0])}. Its checks took {seconds:.0f} s in all.",
             "", load_gpu_check().summary_table({c["check"]: c for c in checks})]
    for name, keys in GPU_RUN_FIGURES.items():
        cuda = [r for r in records.get(name, []) if r.get("device") == "cuda"]
        if cuda:
            lines += ["", f"GPU runs of `benchmarks/{name}.py` (section `{name}` of RESULTS.md):", "",
                      *figure_table(cuda, keys)]
    return "\n".join(lines)


def test_suite_block(records: dict[str, list[dict]]) -> str:
    """docs/tests.md's run time of the whole suite: the last recorded full run."""
    if not records.get("test_suite"):
        return ("No full run of the suite is recorded yet; after one, record it with `python benchmarks/results.py "
                "record test_suite passed=N seconds=S --command \"make test\"`.")
    last = records["test_suite"][-1]
    passed, seconds = last.get("passed", "?"), cell(last.get("seconds", "?"))
    return (f"The last recorded full run: {passed} tests passed in {seconds} s, {run_line(last)} "
            "(section `test_suite` of RESULTS.md).")


def tokenize_once_block(records: dict[str, list[dict]]) -> str:
    """docs/text_data.md's first and second start of the instruction data: the last recorded run."""
    if not records.get("tokenize_once"):
        return "No run of `benchmarks/tokenize_once.py` is recorded yet."
    last = records["tokenize_once"][-1]
    keys = ["records", "first_start_s", "second_start_s", "second_over_first", "goal", "second_peak_growth_mb",
            "second_peak_growth_mb_tenth", "second_heap_growth_mb", "second_heap_growth_mb_tenth"]
    return "\n".join(["The last recorded run (section `tokenize_once` of RESULTS.md):", "",
                      *figure_table([last], [k for k in keys if k in last])])


def doc_blocks(records: dict[str, list[dict]]) -> dict[str, str]:
    """The text of every generated block the docs may hold, by block name."""
    return {"gpu_check": gpu_check_block(records), "test_suite": test_suite_block(records),
            "tokenize_once": tokenize_once_block(records)}


def doc_paths() -> list[Path]:
    """The pages whose generated blocks render() rewrites: the README and docs/*.md."""
    return [DOCS_ROOT / "README.md", *sorted((DOCS_ROOT / "docs").glob("*.md"))]


def fill_blocks(text: str, blocks: dict[str, str], where: str) -> str:
    """``text`` with every generated block's body replaced by the block's current text."""
    def fill(match: re.Match) -> str:
        if match["name"] not in blocks:
            raise ValueError(f"{where}: no generated block named {match['name']!r}; known: {', '.join(blocks)}")
        return f"{match['open']}\n{blocks[match['name']].strip()}\n\n{match['close']}"

    return BLOCK.sub(fill, text)


def stale_docs(records: dict[str, list[dict]]) -> dict[Path, str]:
    """The pages whose generated blocks differ from what the records give now, with their regenerated text."""
    blocks, stale = doc_blocks(records), {}
    for path in doc_paths():
        if path.is_file():
            text = path.read_text()
            if (new := fill_blocks(text, blocks, path.name)) != text:
                stale[path] = new
    return stale


def load_records() -> dict[str, list[dict]]:
    """Every recorded run, by result name (the ``results/*.jsonl`` file stem), in file order."""
    records = {}
    for path in sorted(RESULTS_DIR.glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            records[path.stem] = lines
    return records


def results_markdown(records: dict[str, list[dict]]) -> str:
    """The text of RESULTS.md."""
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/results.py render` from the JSON lines in `benchmarks/results/`; "
             "do not edit by hand. Ratios are ours / baseline, measured in one process, alternating.", ""]
    for name, runs in records.items():
        lines += section(name, runs)
    return "\n".join(lines)


def render() -> Path:
    """Write RESULTS.md from every ``results/*.jsonl`` file, and the generated blocks of the docs."""
    records = load_records()
    RESULTS_MD.write_text(results_markdown(records))
    for path, text in stale_docs(records).items():
        path.write_text(text)
    return RESULTS_MD


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run a benchmark, record its JSON line, regenerate RESULTS.md")
    run_parser.add_argument("name", help="benchmark file name without .py, e.g. layer_drop_speed")
    record_parser = sub.add_parser("record", help="record figures measured another way, regenerate RESULTS.md")
    record_parser.add_argument("name", help="result name, e.g. test_suite")
    record_parser.add_argument("figures", nargs="+", help="key=value, e.g. passed=812 seconds=480")
    record_parser.add_argument("--command", dest="measured", required=True, help="the command that was measured")
    record_parser.add_argument("--note", default="", help="anything a reader must know about the run")
    sub.add_parser("render", help="regenerate RESULTS.md and the docs' generated blocks from benchmarks/results/")
    args, rest = parser.parse_known_args(argv)
    if args.command == "run":
        print(json.dumps(run(args.name, rest)))
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    elif args.command == "record":
        print(json.dumps(record(args.name, parse_figures(args.figures), args.measured, args.note)))
    else:
        print(render())


if __name__ == "__main__":
    main()
