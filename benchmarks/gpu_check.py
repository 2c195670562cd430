"""The real-scale check for one call on a GPU machine: memory and speed at real model shapes, random init, bf16.

    python benchmarks/gpu_check.py [--out results.jsonl]     # one H100/H200: at most 450 s (--deadline)
    python benchmarks/gpu_check.py --cpu-smoke               # every measurement at toy shapes on the CPU

Each measurement runs in its own subprocess with a time budget and prints one JSON line (``"check"`` names it;
a failed or timed-out one prints its error instead), then a markdown table of the figures and goals follows. The
open goals run first (the headline: 3B full fine-tuning at >= 35% MFU), the checks whose figures are already
recorded last, and a whole-run ``--deadline`` (450 s by default, so the call stays under 8 minutes) trims or skips
the last ones: one call of the device tool always returns figures (``--only`` picks the rest for another call).
Needs only torch, lightning, transformers, timm and peft (no jsonargparse, wandb, trl, datasets or network): the
recipes' modules and callbacks are used directly with a
plain ``lightning.Trainer`` or plain loops, never through ``recipes.cli``.

Measurements: supervised fine-tuning throughput at the Llama-3.2-3B and -1B shapes (``sft_throughput.py``: packed
rows of 1024 tokens, 8,192 token positions per optimizer step, bf16-true; full, LoRA r16 and LISA, each eager and
with ``CausalLMModule(compile=True)``: tokens/s, step time, MFU against the card's bf16 dense peak, peak memory);
GRPO rollout engines at the Qwen2.5-0.5B shape (``grpo_engines``: ``generate`` and ``paged``, 8 prompts x 8
completions x 256 new tokens: completion tokens/s and the generation share of the rollout step); MAE ViT-B/16 at
224 px (``mae_speed.py``, bf16, batch 256: the MAE step against the full-token MAE step, eager and compiled, and
fine-tuning's images/s); progressive layer drop on a 24-block GPT-2-medium-sized Llama (``layer_drop_speed.py``,
theta 0.5, bf16, vocabulary padded to 50,304 as GPT-2 is for pre-training, micro-batch 16 x 1024, fused AdamW);
layer sampling at the 1B and 3B shapes (``layer_sampling_memory.py``: full AdamW, LoRA r16 on all linear layers,
LISA gamma=2 with and without the embedding, OwLore; sequence 1024, bf16-true; the methods one after another in
one process, each with its own CUDA peak); GRPO with the default engine (generation, log-prob passes, update, peak
memory); LISA under Lightning's FSDP strategy (``use_orig_params=True``) on one GPU.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FORBIDDEN = ("jsonargparse", "wandb", "trl", "datasets")  # not on the GPU machine
SMOKE_BUDGET = 900  # seconds per smoke check: only a guard (a process start alone can take a minute on a busy CPU)

# Llama-3.2 shapes (tied embedding, grouped-query attention) and the toy shapes of --cpu-smoke.
LLAMA = {
    "1b": ["--layers", "16", "--hidden", "2048", "--mlp", "8192", "--vocab", "128256", "--heads", "32",
           "--kv-heads", "8", "--tie"],
    "3b": ["--layers", "28", "--hidden", "3072", "--mlp", "8192", "--vocab", "128256", "--heads", "24",
           "--kv-heads", "8", "--tie"],
    "smoke": ["--layers", "4", "--hidden", "64", "--mlp", "128", "--vocab", "256", "--heads", "2", "--kv-heads", "1",
              "--tie"],
}
QWEN_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "vocab_size": 151_936}
QWEN_SMOKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "vocab_size": 1000}
GRPO_ENGINES = ("generate", "paged")


def script_checks(smoke: bool) -> dict[str, tuple[list[str], float]]:
    """name: (command, budget in seconds) of the checks that run an existing benchmark script."""
    py = sys.executable
    device = ["--device", "cpu" if smoke else "cuda", "--precision", "bf16-true", "--same-process"]
    # On the GPU: 10 steps, a new draw every 5 (the step-time median is a step between draws, as with the usual
    # interval of 50; GaLore's SVDs run at each draw); the toy run draws every step to exercise the switches.
    sampling = ["--seq", "32" if smoke else "1024", "--batch", "1", "--steps", "4" if smoke else "10", "--interval",
                "1" if smoke else "5", "--warmup", "1" if smoke else "2", "--lora-rank", "16",
                "--methods", "full,lora,lisa,lisa_frozen_embedding,owlore"]
    checks = {}
    for size, budget in ((("smoke", SMOKE_BUDGET),) if smoke else (("3b", 200), ("1b", 130))):
        checks[f"layer_sampling_{size}"] = ([py, str(HERE / "layer_sampling_memory.py"), *LLAMA[size], *sampling,
                                             *device], budget)
    pld = (["--layers", "4", "--hidden", "64", "--vocab", "128", "--seq-len", "16", "--batch-size", "2", "--rounds",
            "1", "--steps", "2", "--threads", "1"] if smoke else
           ["--layers", "24", "--hidden", "1024", "--vocab", "50304", "--seq-len", "1024", "--batch-size", "16",
            "--fused-adamw", "--rounds", "3", "--steps", "6", "--device", "cuda"])
    checks["layer_drop_speed"] = ([py, str(HERE / "layer_drop_speed.py"), *pld, "--dtype", "bfloat16"],
                                  SMOKE_BUDGET if smoke else 80)
    mae = (["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "2", "--steps", "1"] if smoke else
           ["--model", "vit_base_patch16_224", "--img-size", "224", "--batch", "256", "--steps", "10"])
    checks["mae_speed"] = ([py, str(HERE / "mae_speed.py"), *mae, "--dtype", "bfloat16", "--decoder-dim", "512",
                            "--decoder-depth", "8" if not smoke else "1", "--compile"], SMOKE_BUDGET if smoke else 150)
    # packed rows of 1024 tokens, 4 per micro-batch x 2 micro-batches: 8,192 token positions per optimizer step
    sft = (["--max-length", "32", "--rows", "2", "--accumulation", "2", "--warmup", "1", "--steps", "1",
            "--variants", "full_compile,full,lisa,lora"] if smoke else
           ["--max-length", "1024", "--rows", "4", "--accumulation", "2", "--warmup", "2", "--steps", "4"])
    for size, budget in ((("smoke", SMOKE_BUDGET),) if smoke else (("3b", 210), ("1b", 150))):
        checks[f"sft_throughput_{size}"] = ([py, str(HERE / "sft_throughput.py"), *LLAMA[size], *sft, *device[:2]],
                                            budget)
    return checks


# ------------------------------------------------------------------------------------------------ own checks
def grpo_check(smoke: bool) -> dict:
    """Seconds per rollout batch split into generation, log-prob passes and update; peak memory (the default engine)."""
    from rollout_timing import rollout_times

    prompts, g, new_tokens = (2, 2, 4) if smoke else (8, 8, 256)
    times = rollout_times(QWEN_SMOKE if smoke else QWEN_05B, prompts, g, new_tokens, cuda=not smoke)
    return {"check": "grpo", "shape": "qwen2.5-0.5b" if not smoke else "toy", "prompts": prompts, "G": g,
            "new_tokens": new_tokens, **times}


def grpo_engines_check(smoke: bool) -> dict:
    """Completion tokens/s and the generation share of the rollout step for each rollout engine (64 x 256 tokens)."""
    from rollout_timing import rollout_times

    prompts, g, new_tokens = (2, 2, 4) if smoke else (8, 8, 256)
    results = {}
    for engine in GRPO_ENGINES:
        try:
            results[engine] = {"variant": engine, **rollout_times(QWEN_SMOKE if smoke else QWEN_05B, prompts, g,
                                                                  new_tokens, not smoke, engine)}
        except Exception as err:  # noqa: BLE001 - one engine's failure (e.g. an old transformers) is its result
            results[engine] = {"variant": engine, "error": f"{type(err).__name__}: {err}"[:800]}
    out = {"check": "grpo_engines", "shape": "qwen2.5-0.5b" if not smoke else "toy", "prompts": prompts, "G": g,
           "new_tokens": new_tokens, "results": results}
    paged, generate = results.get("paged", {}), results.get("generate", {})
    if "completion_tokens_per_s" in paged and "completion_tokens_per_s" in generate:
        out["paged_over_generate"] = round(paged["completion_tokens_per_s"] / generate["completion_tokens_per_s"], 3)
    return out


def fsdp_lisa_check(smoke: bool) -> dict:
    """LISA under Lightning's FSDP (use_orig_params=True): sampled blocks move, others do not, state bounded."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from callbacks.core.blocks import block_parameter_names, find_blocks
    from callbacks.lisa import LISA, optimizer_state_bytes

    hidden, layers, vocab, seq = (32, 4, 128, 16) if smoke else (1024, 8, 32000, 512)
    strategy = FSDPStrategy(use_orig_params=True, auto_wrap_policy={LlamaDecoderLayer}, sharding_strategy="FULL_SHARD")

    class LM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=hidden // 16,
                              num_key_value_heads=hidden // 16, tie_word_embeddings=False)
            self.model = LlamaForCausalLM(cfg)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0], use_cache=False).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Probe(L.Callback):
        def __init__(self, lisa: LISA) -> None:
            self.lisa, self.rows = lisa, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            named = dict(pl_module.named_parameters())
            parts = find_blocks(pl_module)
            moved = {i for i in range(len(parts)) if any(not torch.equal(named[n], self.before[n])
                                                         for n in block_parameter_names(pl_module, parts, i))}
            trainable = self.lisa.trainable_parameters()
            self.rows.append({"active": list(self.lisa.active), "moved": sorted(moved),
                              "state_bytes": optimizer_state_bytes(trainer.optimizers[0]),
                              "bound_bytes": sum(2 * p.numel() * p.element_size() + 4 for p in trainable)})

    lisa = LISA(n_layers=2, interval=1, seed=0)
    probe = Probe(lisa)
    ids = torch.randint(0, vocab, (6, seq), generator=torch.Generator().manual_seed(0))
    if smoke:  # FSDP needs a GPU process group here: check the strategy builds, run LISA on the plain strategy
        used = "single-device (FSDPStrategy built, not run on CPU)"
        trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, precision="bf16-true", callbacks=[lisa, probe],
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        assert strategy.kwargs.get("use_orig_params") is True
    else:
        used = "fsdp"
        trainer = L.Trainer(max_steps=6, accelerator="cuda", devices=1, strategy=strategy, precision="bf16-true",
                            callbacks=[lisa, probe], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LM(), DataLoader(TensorDataset(ids), batch_size=1))
    rows = probe.rows
    ok_moved = all(r["moved"] == sorted(r["active"]) for r in rows)
    ok_state = all(r["state_bytes"] <= r["bound_bytes"] for r in rows)
    switches = sum(a["active"] != b["active"] for a, b in zip(rows, rows[1:], strict=False))
    return {"check": "fsdp_lisa", "strategy": used, "steps": len(rows), "switches": switches,
            "only_sampled_blocks_moved": ok_moved, "state_within_trainable_bound": ok_state,
            "state_bytes_max": max(r["state_bytes"] for r in rows), "rows": rows}


# name: (function, budget in seconds with --cpu-smoke, budget on the GPU)
OWN_CHECKS = {"grpo": (grpo_check, SMOKE_BUDGET, 120), "fsdp_lisa": (fsdp_lisa_check, SMOKE_BUDGET, 90),
              "grpo_engines": (grpo_engines_check, SMOKE_BUDGET, 110)}
# The open goals first (3B MFU is the headline), so that a run cut short by its deadline has them; the checks whose
# figures are already recorded (layer sampling, grpo, fsdp_lisa) come last.
ORDER = ("sft_throughput_3b", "sft_throughput_smoke", "grpo_engines", "mae_speed", "layer_drop_speed",
         "sft_throughput_1b", "layer_sampling_3b", "layer_sampling_smoke", "grpo", "layer_sampling_1b", "fsdp_lisa")


@functools.cache
def _machine(smoke: bool) -> str:
    """The card's name (asked of a child process, so this one holds no CUDA context), or the CPU."""
    if not smoke:
        proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout.strip()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


# ------------------------------------------------------------------------------------------------ the runner
def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def run_check(name: str, command: list[str], budget: float, env: dict) -> dict:
    """Run one measurement in a subprocess within ``budget`` seconds; its JSON line, named, or the error.

    A layer-sampling run that fails or times out still reports the methods it finished (its ``RESULT`` lines).
    """
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=budget, cwd=ROOT, env=env)
        stdout, error = proc.stdout, None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr}"
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        error = f"timed out after {budget:.0f} s"
    result = _last_json(stdout) if error is None else None
    if result is None:
        partial = {}
        for line in stdout.splitlines():
            if line.startswith("RESULT "):
                method = json.loads(line[len("RESULT "):])
                partial[method.get("variant", method.get("method"))] = method
        error = (error or "printed no JSON line").strip()[-1500:]
        return {"check": name, "error": error, **({"results": partial} if partial else {}),
                "wall_s": round(time.perf_counter() - start, 1)}
    if "benchmark" in result:
        result["script"] = result.pop("benchmark")
    return {"check": name, **{k: v for k, v in result.items() if k != "check"},
            "wall_s": round(time.perf_counter() - start, 1)}


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def summary_table(results: dict[str, dict]) -> str:
    """Markdown table of the headline figures and goals."""
    rows = ["| check | figure | value | goal |", "|---|---|---|---|"]

    def add(check, figure, value, goal=""):
        rows.append(f"| {check} | {figure} | {_fmt(value)} | {goal} |")

    for name, r in results.items():
        if "error" in r:
            add(name, "error", r["error"].strip().splitlines()[-1][:100])
        if name.startswith("layer_sampling") and r.get("results"):
            methods = r["results"]
            for method, m in methods.items():
                add(name, f"{method}: peak GB / step s",
                    f"{m['peak_memory_bytes'] / 1e9:.2f} / {m['step_time_s']:.3f}")
            lisa, lora, full = (methods.get(k) for k in ("lisa_frozen_embedding", "lora", "full"))
            if lisa and lora and lora["peak_memory_bytes"] > 0:
                add(name, "LISA (embedding frozen) peak / LoRA peak",
                    lisa["peak_memory_bytes"] / lora["peak_memory_bytes"], "<= 1.0 at 3B")
            for method in ("lisa", "lisa_frozen_embedding"):
                if full and method in methods and full["step_time_s"] > 0:
                    add(name, f"{method} step time / full FT", methods[method]["step_time_s"] / full["step_time_s"],
                        "<= 0.7")
        if name.startswith("sft_throughput") and r.get("results"):
            sft_rows(name, r["results"], add)
        if "error" in r:
            continue
        if name == "layer_drop_speed":
            add(name, "step-time ratio at theta 0.5", r["ratio"], "<= 0.78")
            add(name, "ideal ratio (a skipped block costs nothing)", r["expected_ratio"])
        elif name == "mae_speed":
            add(name, "MAE images/s", r["batch"] / r["mae_step_s"])
            if "full_token_step_s" in r:
                add(name, "fine-tuning (encoder on every patch) images/s", r["finetune_images_per_s"])
                add(name, "MAE step / full-token MAE step", r["time_ratio"], "<= 0.35")
                add(name, "the same in counted FLOPs", r["counted_flop_ratio"])
                compiled = r.get("compiled")
                if compiled and "error" in compiled:
                    add(name, "compiled: error", compiled["error"][:100])
                elif compiled:
                    add(name, "compiled: MAE images/s", r["batch"] / compiled["mae_step_s"])
                    add(name, "compiled: MAE step / full-token MAE step", compiled["time_ratio"], "<= 0.35")
            else:  # recorded before the full-token MAE step was timed: the ratio is to the fine-tuning step
                add(name, "fine-tuning images/s", r["batch"] / r["full_step_s"])
                add(name, "MAE step / fine-tuning step", r["time_ratio"])
        elif name == "grpo":
            add(name, "generation / log-prob passes / update s",
                f"{r['generation_s']} / {r['logprob_passes_s']} / {r['update_s']}")
            add(name, "peak GB", r["peak_gb"])
        elif name == "grpo_engines":
            for engine, e in r["results"].items():
                if "error" in e:
                    add(name, f"{engine}: error", e["error"].strip().splitlines()[-1][:100])
                    continue
                add(name, f"{engine}: completion tokens/s", e["completion_tokens_per_s"])
                add(name, f"{engine}: generation / rollout step", e["generation_share"], "<= 0.6 (paged)")
            add(name, "paged / generate completion tokens/s", r.get("paged_over_generate"), ">= 3")
        elif name == "fsdp_lisa":
            add(name, "only sampled blocks moved; state bounded",
                f"{r['only_sampled_blocks_moved']}; {r['state_within_trainable_bound']}", "True; True")
    return "\n".join(rows)


def sft_rows(name: str, variants: dict[str, dict], add) -> None:
    """The SFT throughput check's rows: each variant's figures, the 3B MFU goal and LISA's step against full's."""
    for variant, v in variants.items():
        if "error" in v:
            add(name, f"{variant}: error", v["error"].strip().splitlines()[-1][:100])
        else:
            add(name, f"{variant}: tokens/s / step s / MFU / peak GB",
                f"{v['tokens_per_s']:.0f} / {v['step_s']:.3f} / {_fmt(v['mfu'])} / {_fmt(v['peak_gb'])}")
    if "mfu" in variants.get("full_compile", {}):
        add(name, "full, packed + compiled: MFU", variants["full_compile"]["mfu"], ">= 0.35 at 3B")
    for suffix, words in (("", "eager"), ("_compile", "compiled")):
        lisa, full = variants.get(f"lisa{suffix}", {}), variants.get(f"full{suffix}", {})
        if "step_s" in lisa and full.get("step_s"):
            add(name, f"LISA step / full step ({words})", lisa["step_s"] / full["step_s"], "<= 0.6")


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy shapes on the CPU (a test runs this)")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--only", default=None, help="comma-separated check names")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole run: later checks get what is left, or are skipped (default: "
                             "450 on the GPU, none with --cpu-smoke)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one own check in this process
    args = parser.parse_args(argv)
    if args.deadline is None and not args.cpu_smoke:
        args.deadline = 450.0
    if args.one:
        result = OWN_CHECKS[args.one][0](args.cpu_smoke)
        result["forbidden_modules_imported"] = [m for m in FORBIDDEN if m in sys.modules]
        print(json.dumps(result), flush=True)
        return {args.one: result}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(
               [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    if args.cpu_smoke:  # as on the GPU machine: the FORBIDDEN packages are not installed
        env["PYTHONPATH"] = os.pathsep.join([str(HERE / "gpu_env"), env["PYTHONPATH"]])
        env["HIDE_PACKAGES"] = ",".join(FORBIDDEN)
    smoke_flag = ["--cpu-smoke"] if args.cpu_smoke else []
    commands = script_checks(args.cpu_smoke)
    commands.update({name: ([sys.executable, __file__, "--one", name, *smoke_flag], budgets[0 if args.cpu_smoke else 1])
                     for name, (_, *budgets) in OWN_CHECKS.items()})
    order = [name for name in ORDER if name in commands] + [name for name in commands if name not in ORDER]
    wanted = set(args.only.split(",")) if args.only else set(order)
    if unknown := sorted(wanted - set(order)):
        parser.error(f"--only: no check named {', '.join(unknown)}; the checks are {', '.join(order)}")
    deadline = time.perf_counter() + (args.deadline or float("inf"))
    results: dict[str, dict] = {}
    for name in (n for n in order if n in wanted):
        command, budget = commands[name]
        left = deadline - time.perf_counter()
        if left < 20:
            result = {"check": name, "error": f"skipped: the run's {args.deadline:.0f} s deadline was reached"}
        else:
            result = run_check(name, command, min(budget, left), env)
        result.setdefault("device", "cpu" if args.cpu_smoke else "cuda")
        results[name] = result
        print(json.dumps({**result, "benchmark": "gpu_check"}), flush=True)
        if args.out:  # recorded as benchmarks/results.py records a run, so RESULTS.md can be rendered from it
            record = {"_command": " ".join(["python", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
                      "_date": datetime.date.today().isoformat(), "_machine": _machine(args.cpu_smoke),
                      "benchmark": "gpu_check", **result}
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
    print("\n" + summary_table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
