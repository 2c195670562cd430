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
import sft_throughput  # noqa: E402


@pytest.mark.slow
def test_cpu_smoke_runs_every_check(tmp_path, capsys):
    out = tmp_path / "gpu.jsonl"
    results = gpu_check.main(["--cpu-smoke", "--out", str(out)])
    # the GPU run's layer_sampling_1b/_3b become one toy-shaped layer_sampling_smoke on the CPU
    assert set(results) == {"layer_sampling_smoke", "layer_drop_speed", "mae_speed", "grpo", "fsdp_lisa",
                            "sft_throughput_smoke", "grpo_engines"}
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
    # the compiled SFT and MAE variants and both rollout engines run
    sft = results["sft_throughput_smoke"]["results"]
    assert list(sft) == ["full_compile", "full", "lisa", "lora"]
    for variant in sft.values():
        assert variant["tokens_per_s"] > 0 and variant["tokens_per_step"] == 128 and variant["mfu"] is None
    assert results["mae_speed"]["compiled"]["time_ratio"] > 0
    for engine in results["grpo_engines"]["results"].values():
        assert engine["completion_tokens_per_s"] > 0 and 0 < engine["generation_share"] < 1
    out = capsys.readouterr().out
    assert "| check | figure | value | goal |" in out
    assert "| grpo_engines | paged / generate completion tokens/s |" in out


def test_the_gpu_run_makes_the_documented_checks():
    """docs/real_scale.md's table of checks names these; the GPU run makes exactly them."""
    gpu_run = set(gpu_check.script_checks(False)) | set(gpu_check.OWN_CHECKS)
    assert gpu_run == {"layer_sampling_1b", "layer_sampling_3b", "layer_drop_speed", "mae_speed", "grpo", "fsdp_lisa",
                       "sft_throughput_1b", "sft_throughput_3b", "grpo_engines"}


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
    assert "--only: no check named mae; the checks are sft_throughput_smoke, grpo_engines, mae_speed" in err


def test_summary_leaves_out_a_ratio_whose_denominator_is_zero():
    """A toy CPU run can add nothing to its process's peak RSS: no LISA / LoRA memory ratio then, no crash."""
    zero = {"peak_memory_bytes": 0, "step_time_s": 0.1}
    methods = {"full": zero, "lora": zero, "lisa_frozen_embedding": {**zero, "step_time_s": 0.05}}
    table = gpu_check.summary_table({"layer_sampling_smoke": {"check": "layer_sampling_smoke", "results": methods}})
    assert "| layer_sampling_smoke | lisa_frozen_embedding step time / full FT | 0.5 | <= 0.7 |" in table
    assert "LoRA peak" not in table


def test_the_open_goals_run_first_on_the_gpu_in_the_documented_order():
    """A run cut short by its deadline still has the 3B MFU headline and the other open goals; real_scale.md says
    the order the run uses."""
    gpu_run = set(gpu_check.script_checks(False)) | set(gpu_check.OWN_CHECKS)
    order = [name for name in gpu_check.ORDER if name in gpu_run]
    assert order[:3] == ["sft_throughput_3b", "grpo_engines", "mae_speed"] and order[-1] == "fsdp_lisa"
    page = " ".join((ROOT / "docs" / "real_scale.md").read_text().split())
    sentence = page.split("those already recorded last, in this order: ", 1)[1].split(". ", 1)[0]
    assert sentence.replace("`", "").split(", ") == order


def test_summary_rows_and_goals_of_the_new_checks():
    full = {"variant": "full", "tokens_per_s": 20000.0, "step_s": 0.4, "mfu": 0.3, "peak_gb": 50.0}
    sft = {"full_compile": {**full, "variant": "full_compile", "step_s": 0.3, "mfu": 0.4},
           "full": full, "lisa": {**full, "variant": "lisa", "step_s": 0.2},
           "lisa_compile": {"variant": "lisa_compile", "error": "timed out after 210 s"}}
    engines = {"generate": {"completion_tokens_per_s": 2000.0, "generation_share": 0.9},
               "paged": {"completion_tokens_per_s": 7000.0, "generation_share": 0.5}}
    mae = {"batch": 256, "mae_step_s": 0.05, "full_token_step_s": 0.1, "time_ratio": 0.5, "counted_flop_ratio": 0.31,
           "finetune_images_per_s": 3000.0, "compiled": {"mae_step_s": 0.032, "time_ratio": 0.32}}
    table = gpu_check.summary_table({
        "sft_throughput_3b": {"check": "sft_throughput_3b", "results": sft},
        "grpo_engines": {"check": "grpo_engines", "results": engines, "paged_over_generate": 3.5},
        "mae_speed": {"check": "mae_speed", **mae}})
    assert "| sft_throughput_3b | full: tokens/s / step s / MFU / peak GB | 20000 / 0.400 / 0.3 / 50 |  |" in table
    assert "| sft_throughput_3b | full, packed + compiled: MFU | 0.4 | >= 0.35 at 3B |" in table
    assert "| sft_throughput_3b | LISA step / full step (eager) | 0.5 | <= 0.6 |" in table
    assert "| sft_throughput_3b | lisa_compile: error | timed out after 210 s |  |" in table
    assert "LISA step / full step (compiled)" not in table  # no compiled LISA figure to compare
    assert "| grpo_engines | paged: generation / rollout step | 0.5 | <= 0.6 (paged) |" in table
    assert "| grpo_engines | paged / generate completion tokens/s | 3.5 | >= 3 |" in table
    assert "| mae_speed | compiled: MAE step / full-token MAE step | 0.32 | <= 0.35 |" in table


def test_a_failed_sft_run_keeps_its_finished_variants_by_name():
    """The compiled and eager runs of one method are told apart by their variant name."""
    lines = [{"variant": "full_compile", "method": "full", "tokens_per_s": 9.0, "step_s": 1.0, "mfu": None,
              "peak_gb": None}, {"variant": "full", "method": "full", "tokens_per_s": 5.0, "step_s": 2.0,
                                 "mfu": None, "peak_gb": None}]
    code = "".join(f"print('RESULT ' + {json.dumps(x)!r}, flush=True)\n" for x in lines)
    code += "raise SystemExit('CUDA out of memory')\n"  # the third variant fails the process
    result = gpu_check.run_check("sft_throughput_3b", [sys.executable, "-c", code], budget=60, env=dict(os.environ))
    assert result["error"].startswith("exit 1: CUDA out of memory")
    assert list(result["results"]) == ["full_compile", "full"]
    assert "| sft_throughput_3b | full_compile: tokens/s / step s / MFU / peak GB | 9 / 1.000 / - / - |" in \
        gpu_check.summary_table({"sft_throughput_3b": result})


def test_packed_batches_count_tokens_and_attention_per_example():
    args = sft_throughput.argparse.Namespace(layers=2, hidden=8, vocab=50, max_length=64, rows=3)
    batches = sft_throughput.packed_batches(args, 2)
    assert len(batches) == 2
    for batch in batches:
        assert batch["input_ids"].shape == (3, 64) and int(batch["num_tokens"].sum()) <= 3 * 64
        squares = 0
        for row, n in zip(batch["position_ids"].tolist(), batch["num_tokens"].tolist(), strict=True):
            starts = [i for i in range(n) if row[i] == 0] + [n]
            squares += sum((b - a) ** 2 for a, b in zip(starts, starts[1:], strict=False))
        assert batch["attention_flops"] == 12 * 2 * 8 * squares


