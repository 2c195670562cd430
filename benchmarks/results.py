"""Record benchmark runs and generate ``benchmarks/RESULTS.md`` from them: figures are never typed by hand.

Every benchmark prints its figures as one JSON line (the last line of its output). ``run`` executes a benchmark,
appends that line, with the command, date and machine, to ``benchmarks/results/<name>.jsonl`` and regenerates
``RESULTS.md``; ``render`` only regenerates it.

    python benchmarks/results.py run layer_drop_speed --quick
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
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
WIDE = 8  # a run with more figures than this is shown as a key/value table instead of one row


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
        return ""
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


def gpu_check_tables(records: list[dict]) -> list[str]:
    """One headline table per ``gpu_check.py`` run (its checks share a command and date); raw figures stay in
    ``results/gpu_check.jsonl``."""
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parent / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    runs: dict[tuple, list[dict]] = {}
    for record in records:
        runs.setdefault((record.get("_command"), record.get("_date")), []).append(record)
    lines = []
    for i, checks in enumerate(runs.values(), 1):
        lines += [f"Run {i}: {run_line(checks[0])}", "", gpu_check.summary_table({r["check"]: r for r in checks}), ""]
    return lines


def render() -> Path:
    """Write RESULTS.md from every ``results/*.jsonl`` file."""
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/results.py render` from the JSON lines in `benchmarks/results/`; "
             "do not edit by hand. Ratios are ours / baseline, measured in one process, alternating.", ""]
    for path in sorted(RESULTS_DIR.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if records:
            lines += section(path.stem, records)
    RESULTS_MD.write_text("\n".join(lines))
    return RESULTS_MD


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run a benchmark, record its JSON line, regenerate RESULTS.md")
    run_parser.add_argument("name", help="benchmark file name without .py, e.g. layer_drop_speed")
    sub.add_parser("render", help="regenerate RESULTS.md from benchmarks/results/*.jsonl")
    args, rest = parser.parse_known_args(argv)
    if args.command == "run":
        print(json.dumps(run(args.name, rest)))
    else:
        print(render())


if __name__ == "__main__":
    main()
