"""benchmarks/results.py: runs are recorded from the benchmark's own JSON line, RESULTS.md and the docs' figure
blocks are generated, and no page retypes a recorded figure by hand."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_results_module():
    spec = importlib.util.spec_from_file_location("bench_results", BENCH / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def results(tmp_path, monkeypatch):
    module = load_results_module()
    monkeypatch.setattr(module, "HERE", tmp_path)
    monkeypatch.setattr(module, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(module, "RESULTS_MD", tmp_path / "RESULTS.md")
    monkeypatch.setattr(module, "DOCS_ROOT", tmp_path / "repo")
    return module


def test_run_records_the_last_json_line_and_renders_it(results, tmp_path):
    (tmp_path / "toy_speed.py").write_text(
        '"""Toy: ours vs baseline step time."""\nimport json, sys\nprint("warming up")\n'
        'print(json.dumps({"ratio": 0.123456, "ours_s": 1.5, "extra": {"n": int(sys.argv[1])}}))\n')
    record = results.run("toy_speed", ["7"])
    assert record["ratio"] == 0.123456 and record["extra"] == {"n": 7}
    assert record["_command"] == "python benchmarks/toy_speed.py 7"
    lines = (tmp_path / "results" / "toy_speed.jsonl").read_text().splitlines()
    assert [json.loads(line)["ratio"] for line in lines] == [0.123456]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## toy_speed" in text and "Toy: ours vs baseline step time." in text
    assert "| ratio | ours_s | extra.n |" in text and "| 1 | 0.1235 | 1.5 | 7 |" in text


def test_a_benchmark_without_a_json_line_is_not_recorded(results, tmp_path):
    (tmp_path / "silent.py").write_text("print('no figures')\n")
    with pytest.raises(ValueError, match="no JSON line"):
        results.run("silent", [])
    assert not (tmp_path / "results" / "silent.jsonl").exists()


def test_a_failing_benchmark_is_not_recorded(results, tmp_path):
    (tmp_path / "broken.py").write_text("import sys\nprint('{\"ratio\": 1}')\nsys.exit(3)\n")
    with pytest.raises(SystemExit, match="status 3"):
        results.run("broken", [])
    assert not (tmp_path / "results").exists()


def test_committed_results_md_matches_the_recorded_lines():
    """RESULTS.md is exactly what the generator makes from benchmarks/results/*.jsonl (never edited by hand)."""
    module = load_results_module()
    committed = (BENCH / "RESULTS.md").read_text()
    assert module.results_markdown(module.load_records()) == committed, \
        "regenerate with: python benchmarks/results.py render"


def test_the_docs_generated_blocks_match_the_recorded_lines():
    """Every generated block of the README and docs/*.md is what render() would write now."""
    module = load_results_module()
    stale = module.stale_docs(module.load_records())
    assert not stale, f"{sorted(p.name for p in stale)}: regenerate with: python benchmarks/results.py render"
    pages = {p.name: p.read_text() for p in module.doc_paths()}
    assert "<!-- results: gpu_check -->" in pages["real_scale.md"]
    assert "<!-- results: test_suite -->" in pages["tests.md"]


def _gpu_check_line(command: str, check: str, **figures) -> dict:
    return {"_command": command, "_date": "2026-01-02", "_machine": "NVIDIA H200", "benchmark": "gpu_check",
            "check": check, "wall_s": 10.0, **figures}


def test_render_writes_the_blocks_of_the_pages_and_leaves_the_rest(results, tmp_path):
    docs = tmp_path / "repo" / "docs"
    docs.mkdir(parents=True)
    page = docs / "page.md"
    page.write_text("Intro.\n\n<!-- results: gpu_check -->\nold text 0.123\n<!-- /results -->\n\nOutro.\n"
                    "<!-- results: test_suite -->\n<!-- /results -->\n")
    (tmp_path / "results").mkdir()
    fsdp = {"only_sampled_blocks_moved": True, "state_within_trainable_bound": False}
    full = {"variant": "full_compile", "tokens_per_s": 21500.4, "step_s": 0.381, "mfu": 0.372, "peak_gb": 48.2}
    sft = {"full_compile": full, "lisa_compile": {**full, "variant": "lisa_compile", "step_s": 0.2},
           "lora": {"variant": "lora", "error": "exit 1: RuntimeError: CUDA out of memory"}}
    lines = [_gpu_check_line("python benchmarks/gpu_check.py", "sft_throughput_3b", results=sft),
             _gpu_check_line("python benchmarks/gpu_check.py", "fsdp_lisa", **fsdp),
             _gpu_check_line("python benchmarks/gpu_check.py --cpu-smoke", "grpo", generation_s=9.0,
                             logprob_passes_s=1.0, update_s=2.0, peak_gb=0.5)]
    (tmp_path / "results" / "gpu_check.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    results.render()
    text = page.read_text()
    assert text.startswith("Intro.\n\n<!-- results: gpu_check -->\nThe latest GPU run of `gpu_check.py`: "
                           "`python benchmarks/gpu_check.py` on NVIDIA H200, 2026-01-02. Its checks took 20 s in all.")
    assert "| fsdp_lisa | only sampled blocks moved; state bounded | True; False | True; True |" in text
    assert ("| sft_throughput_3b | full_compile: tokens/s / step s / MFU / peak GB | 21500 / 0.381 / 0.372 / 48.2 |"
            in text)
    assert "| sft_throughput_3b | full, packed + compiled: MFU | 0.372 | >= 0.35 at 3B |" in text
    assert "| sft_throughput_3b | LISA step / full step (compiled) | 0.525 | <= 0.6 |" in text
    assert "| sft_throughput_3b | lora: error | exit 1: RuntimeError: CUDA out of memory |  |" in text
    assert "old text" not in text and "| grpo |" not in text  # the CPU smoke run is not the GPU figures
    assert "\n\n<!-- /results -->\n\nOutro.\n" in text
    assert "No full run of the suite is recorded yet" in text
    assert results.stale_docs(results.load_records()) == {}

    entry = results.record("test_suite", results.parse_figures(["passed=812", "seconds=480.5"]), "make test")
    assert entry["passed"] == 812 and entry["seconds"] == 480.5 and entry["_command"] == "make test"
    text = page.read_text()
    assert "The last recorded full run: 812 tests passed in 480.5 s, `make test` on " in text
    assert "## test_suite" in (tmp_path / "RESULTS.md").read_text()


def test_an_unknown_block_name_is_an_error(results, tmp_path):
    docs = tmp_path / "repo" / "docs"
    docs.mkdir(parents=True)
    (docs / "page.md").write_text("<!-- results: nope -->\n<!-- /results -->\n")
    with pytest.raises(ValueError, match="page.md: no generated block named 'nope'"):
        results.render()


def test_record_rejects_bad_figures(results):
    with pytest.raises(SystemExit, match="key=value"):
        results.parse_figures(["passed"])
    with pytest.raises(SystemExit, match="a result name"):
        results.record("Test Suite", {"passed": 1}, "make test")


# A number of three or more significant digits, with a decimal point or thousands commas (e.g. 0.918, 4,851, 33.7)
NUMBER = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+|\d+\.\d+)(?![\w]|[.,]\d)")


def recorded_figures(records: dict[str, list[dict]]) -> set[str]:
    """How each recorded figure may be written by hand: rounded to 1-4 decimals, in its unit or in GB, ms or
    thousands (bytes and seconds are what the benchmarks record)."""
    values: list[float] = []

    def walk(value, key=""):
        if isinstance(value, dict):
            for k, v in value.items():
                if not k.startswith("_"):
                    walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool) and value >= 10**6):
            values.append(float(value))

    for runs in records.values():
        for run in runs:
            walk(run)
    forms = set()
    for value in values:
        for scaled in (value, value / 1e9, value / 2**30, value / 1e6, value * 1000):
            forms |= {f"{round(scaled, d):.{d}f}" for d in range(1, 5)}
            if abs(scaled) >= 1000:
                forms.add(f"{round(scaled):,}")
    return forms


def typed_figures(text: str, figures: set[str]) -> list[str]:
    """Numbers of 3+ significant digits in ``text``, outside generated blocks and code, that equal a recorded
    figure. Shorter numbers (0.5, 1.3x) are left out: too many of them are settings or goals."""
    module = load_results_module()
    text = module.BLOCK.sub("", text)
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    found = []
    for line in text.splitlines():
        for number in (m[1] for m in NUMBER.finditer(line)):
            if len(re.sub(r"\D", "", number).lstrip("0")) >= 3 and number in figures:
                found.append(f"{number}: {line.strip()[:100]}")
    return found


def test_the_typed_figure_check_finds_a_retyped_figure():
    figures = recorded_figures({"x": [{"_date": "2026", "ratio": 0.918, "peak_bytes": 33_700_000_000,
                                       "images_per_s": 4850.7, "batch": 256}]})
    text = ("LISA / LoRA **0.918**, peak 33.7 GB, 4,851 images/s; batch 256, theta 0.5, 0.92\n"
            "<!-- results: gpu_check -->\n0.918\n<!-- /results -->\n```bash\nrun --x 0.918\n```\n")
    assert [f.split(":")[0] for f in typed_figures(text, figures)] == ["0.918", "33.7", "4,851"]


def test_no_page_retypes_a_recorded_figure():
    """Figures come from benchmarks/results/ through generated blocks or RESULTS.md links, never typed by hand."""
    module = load_results_module()
    figures = recorded_figures(module.load_records())
    found = {p.name: hits for p in module.doc_paths() if (hits := typed_figures(p.read_text(), figures))}
    assert not found, f"hand-typed figures that benchmarks/results/ records (use a generated block or link): {found}"


def test_run_rejects_an_unknown_benchmark(results):
    with pytest.raises(SystemExit, match="no benchmark 'nope'"):
        results.run("nope", [])
