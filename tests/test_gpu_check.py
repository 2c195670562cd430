"""``benchmarks/gpu_check.py --cpu-smoke``: every GPU measurement runs at toy shapes, without jsonargparse/wandb/trl."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_cpu_smoke_runs_every_check(tmp_path, capsys):
    out = tmp_path / "gpu.jsonl"
    results = gpu_check.main(["--cpu-smoke", "--out", str(out)])
    expected = {name for name, _, _ in gpu_check.script_checks(True)} | set(gpu_check.OWN_CHECKS)
    assert set(results) == expected
    errors = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not errors, errors
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["check"] for r in lines] == list(results) and all(r["benchmark"] == "gpu_check" for r in lines)
    assert results["grpo"]["forbidden_modules_imported"] == []
    assert results["fsdp_lisa"]["only_sampled_blocks_moved"] and results["fsdp_lisa"]["state_within_trainable_bound"]
    assert set(results["layer_sampling_smoke"]["results"]) == {"full", "lora", "lisa", "lisa_frozen_embedding",
                                                               "owlore"}
    assert results["mae_speed"]["dtype"] == results["layer_drop_speed"]["dtype"] == "bfloat16"
    assert "| check | figure | value | goal |" in capsys.readouterr().out


def test_smoke_environment_hides_the_packages_the_gpu_machine_lacks():
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'benchmarks' / 'gpu_env'}{os.pathsep}{ROOT}",
           "HIDE_PACKAGES": ",".join(gpu_check.FORBIDDEN)}
    code = ("import importlib.util, lightning.pytorch.cli as cli\n"
            "assert not cli._JSONARGPARSE_SIGNATURES_AVAILABLE and importlib.util.find_spec('wandb') is None\n"
            "try:\n    import jsonargparse\nexcept ModuleNotFoundError:\n    print('hidden')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "hidden"
