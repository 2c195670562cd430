"""benchmarks/results.py: runs are recorded from the benchmark's own JSON line and RESULTS.md is generated."""

from __future__ import annotations

import importlib.util
import json
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


def test_committed_results_md_matches_the_recorded_lines(tmp_path, monkeypatch):
    """RESULTS.md is exactly what the generator makes from benchmarks/results/*.jsonl (never edited by hand)."""
    module = load_results_module()
    committed = (BENCH / "RESULTS.md").read_text()
    monkeypatch.setattr(module, "RESULTS_MD", tmp_path / "RESULTS.md")
    assert module.render().read_text() == committed, "regenerate with: python benchmarks/results.py render"


def test_run_rejects_an_unknown_benchmark(results):
    with pytest.raises(SystemExit, match="no benchmark 'nope'"):
        results.run("nope", [])
