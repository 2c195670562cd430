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
    # the GPU run's layer_sampling_1b/_3b become one toy-shaped layer_sampling_smoke on the CPU
    assert set(results) == {"layer_sampling_smoke", "layer_drop_speed", "mae_speed", "grpo", "fsdp_lisa"}
    errors = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not errors, errors
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["check"] for r in lines] == list(results) and all(r["benchmark"] == "gpu_check" for r in lines)
    assert all(r["_command"].startswith("python benchmarks/gpu_check.py --cpu-smoke") and r["_date"] for r in lines)
    assert results["grpo"]["forbidden_modules_imported"] == []
    assert results["fsdp_lisa"]["only_sampled_blocks_moved"] and results["fsdp_lisa"]["state_within_trainable_bound"]
    assert set(results["layer_sampling_smoke"]["results"]) == {"full", "lora", "lisa", "lisa_frozen_embedding",
                                                               "owlore"}
    assert results["mae_speed"]["dtype"] == results["layer_drop_speed"]["dtype"] == "bfloat16"
    assert "| check | figure | value | goal |" in capsys.readouterr().out


def test_the_gpu_run_makes_the_documented_checks():
    """docs/real_scale.md's table of checks names these; the GPU run makes exactly them."""
    gpu_run = set(gpu_check.script_checks(False)) | set(gpu_check.OWN_CHECKS)
    assert gpu_run == {"layer_sampling_1b", "layer_sampling_3b", "layer_drop_speed", "mae_speed", "grpo", "fsdp_lisa"}


def test_smoke_environment_hides_the_packages_the_gpu_machine_lacks():
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'benchmarks' / 'gpu_env'}{os.pathsep}{ROOT}",
           "HIDE_PACKAGES": ",".join(gpu_check.FORBIDDEN)}
    code = ("import importlib.util, lightning.pytorch.cli as cli\n"
            "assert not cli._JSONARGPARSE_SIGNATURES_AVAILABLE and importlib.util.find_spec('wandb') is None\n"
            "try:\n    import jsonargparse\nexcept ModuleNotFoundError:\n    print('hidden')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "hidden"


def test_deadline_skips_the_checks_it_leaves_no_time_for(capsys):
    results = gpu_check.main(["--cpu-smoke", "--only", "mae_speed,grpo", "--deadline", "5"])
    assert set(results) == {"mae_speed", "grpo"}
    assert all(r["error"].startswith("skipped: the run's 5 s deadline") for r in results.values())
    assert "| mae_speed | error | skipped" in capsys.readouterr().out


def test_a_timed_out_layer_sampling_run_keeps_the_methods_it_finished():
    method = {"method": "full", "peak_memory_bytes": 2e9, "step_time_s": 0.5}
    lora = {**method, "method": "lora", "peak_memory_bytes": 1e9}
    code = (f"import time\nprint('RESULT ' + {json.dumps(method)!r}, flush=True)\n"
            f"print('RESULT ' + {json.dumps(lora)!r}, flush=True)\ntime.sleep(60)\n")
    result = gpu_check.run_check("layer_sampling_3b", [sys.executable, "-c", code], budget=5, env=dict(os.environ))
    assert result["error"] == "timed out after 5 s"
    assert set(result["results"]) == {"full", "lora"}
    table = gpu_check.summary_table({"layer_sampling_3b": result})
    assert "| layer_sampling_3b | error | timed out after 5 s |" in table
    assert "| layer_sampling_3b | lora: peak GB / step s | 1.00 / 0.500 |" in table


def test_only_names_an_unknown_check_is_an_error(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--cpu-smoke", "--only", "grpo,mae"])
    err = capsys.readouterr().err
    assert "--only: no check named mae; the checks are layer_sampling_smoke, layer_drop_speed" in err


def test_summary_leaves_out_a_ratio_whose_denominator_is_zero():
    """A toy CPU run can add nothing to its process's peak RSS: no LISA / LoRA memory ratio then, no crash."""
    zero = {"peak_memory_bytes": 0, "step_time_s": 0.1}
    methods = {"full": zero, "lora": zero, "lisa_frozen_embedding": {**zero, "step_time_s": 0.05}}
    table = gpu_check.summary_table({"layer_sampling_smoke": {"check": "layer_sampling_smoke", "results": methods}})
    assert "| layer_sampling_smoke | lisa_frozen_embedding step time / full FT | 0.5 | <= 0.7 |" in table
    assert "LoRA peak" not in table
