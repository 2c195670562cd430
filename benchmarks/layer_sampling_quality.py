"""Small-scale check of layer-wise fine-tuning quality: full FT, LoRA, LISA, OwLore, BAdam on synthetic tasks.

    python benchmarks/layer_sampling_quality.py [--quick]

The papers fine-tune pretrained models, so a random-init base is first pre-trained (full AdamW) on the
``addition`` and ``reversal`` task mix, once: the base is cached under ``data/layer_sampling_quality/`` keyed by
its settings and reused by later runs. Each method then fine-tunes that base on the held-out ``sorting`` task
with the same step budget, the same learning-rate schedule and 3 seeds, and is scored on the held-out sorting
problems (exact match of greedy answers, token loss). Model: Llama, 8 blocks, hidden 128 (so 2 sampled blocks
are 1/4 of the depth). LoRA: r=8 on all linear layers, its own (higher) learning rate as is usual for adapters.
LISA/OwLore: 2 blocks, interval 20; OwLore uses GaLore rank hidden/8 and computes its outlier scores from the
training data; LISA-importance draws blocks in proportion to their block influence 1 - cos(h_in, h_out) on 4
training batches. BAdam: one block at a time, descending, K = max(n / (B * D), 50) steps per block (the paper's
rule), blocks only. Prints one JSON line: per method, mean and per-seed exact match and loss.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from callbacks.badam import BAdam  # noqa: E402
from callbacks.core.galore import GaLoreAdamW  # noqa: E402
from callbacks.lisa import LISA  # noqa: E402
from callbacks.owlore import OwLore  # noqa: E402
from datamodules.instruction import InstructionDataModule  # noqa: E402
from recipes.causal_lm import CausalLMModule, LoraSettings  # noqa: E402

MODEL = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 8,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
         "tie_word_embeddings": False}
METHODS = ("full", "lora", "lisa", "lisa_importance", "owlore", "badam")
PRETRAIN_TASKS = ("addition", "reversal")
PRETRAIN_SIZE = 4000


def data(work: Path, tasks: tuple[str, ...], size: int, seed: int, batch_size: int) -> InstructionDataModule:
    return InstructionDataModule(tokenizer="char", max_length=40, batch_size=batch_size, seed=seed,
                                 synthetic_dir=str(work / "-".join(tasks)), synthetic_train_size=size,
                                 synthetic_tasks=tasks)


def fit(module: CausalLMModule, datamodule, steps: int, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=list(callbacks), num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def pretrain(work: Path, steps: int, batch_size: int, cache: Path) -> Path:
    """The pre-trained base, trained once per setting and cached under ``cache``."""
    settings = {"model": MODEL, "tasks": PRETRAIN_TASKS, "size": PRETRAIN_SIZE, "steps": steps,
                "batch_size": batch_size, "lr": 3e-3, "warmup_steps": 20, "seed": 0}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"base-{key}"
    if (path / "config.json").exists():
        return path
    L.seed_everything(0, verbose=False)
    module = CausalLMModule(model_config=MODEL, optimizer=partial(torch.optim.AdamW, lr=3e-3), warmup_steps=20)
    fit(module, data(work, PRETRAIN_TASKS, PRETRAIN_SIZE, 0, batch_size), steps)
    tmp = path.with_name(path.name + ".tmp")
    module.model.save_pretrained(tmp)
    (tmp / "settings.json").write_text(json.dumps(settings, indent=1))
    tmp.rename(path)  # a crash mid-write never leaves a half-written base behind
    return path


def finetune(method: str, base: Path, work: Path, steps: int, seed: int, lr: float, lora_lr: float,
             batch_size: int, badam_interval: int) -> dict:
    L.seed_everything(seed, verbose=False)
    callbacks, lora, optimizer = [], None, partial(torch.optim.AdamW, lr=lr)
    if method == "lora":
        lora, optimizer = LoraSettings(r=8, alpha=16), partial(torch.optim.AdamW, lr=lora_lr)
    elif method == "lisa":
        callbacks = [LISA(n_layers=2, interval=20, seed=seed)]
    elif method == "lisa_importance":
        callbacks = [LISA(n_layers=2, interval=20, seed=seed, sampling="importance", importance_batches=4)]
    elif method == "badam":
        callbacks = [BAdam(interval=badam_interval, order="descending", seed=seed)]
    elif method == "owlore":
        callbacks = [OwLore(n_layers=2, interval=20, calibration_batches=4, seed=seed)]
        optimizer = partial(GaLoreAdamW, lr=lr, rank=MODEL["hidden_size"] // 8, update_proj_gap=100, scale=1.0)
    module = CausalLMModule(model_path=str(base), optimizer=optimizer, warmup_steps=10, lora=lora,
                            exact_match_batches=100, max_new_tokens=8)
    datamodule = data(work, ("sorting",), 2000, seed, batch_size)
    start = time.perf_counter()
    trainer = fit(module, datamodule, steps, callbacks)
    seconds = time.perf_counter() - start
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    out = {"exact_match": round(metrics["test/exact_match"], 4), "loss": round(metrics["test/loss"], 4),
           "train_seconds": round(seconds, 1)}
    print(f"{method} seed {seed}: {out}", file=sys.stderr, flush=True)
    if method == "owlore":
        out["owlore_probabilities"] = [round(float(p), 3) for p in callbacks[0].probabilities()]
    if method == "lisa_importance":
        weights = callbacks[0].sampling_weights(MODEL["num_hidden_layers"])
        out["importance_probabilities"] = [round(float(p), 3) for p in weights / weights.sum()]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short budgets (a few minutes on 2 CPU cores)")
    parser.add_argument("--pretrain_steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=160, help="fine-tuning optimizer steps per method and seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora_lr", type=float, default=3e-3)
    parser.add_argument("--batch_size", type=int, default=32, help="fine-tuning batch size")
    parser.add_argument("--pretrain_batch_size", type=int, default=32)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--cache", default=str(ROOT / "data" / "layer_sampling_quality"),
                        help="where the pre-trained base is cached (keyed by its settings)")
    args = parser.parse_args()
    if args.quick:  # a few minutes on a busy shared 2-core CPU (OMP_NUM_THREADS=1 helps there)
        args.pretrain_steps, args.steps, args.batch_size, args.pretrain_batch_size, args.seeds = 60, 16, 16, 16, 1
    # BAdam's rule K = max(n / (B * D), 50), capped so that every block is visited within the budget
    n_blocks = MODEL["num_hidden_layers"]
    badam_interval = max(1, min(max(2000 // (args.batch_size * n_blocks), 50), args.steps // n_blocks))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = pretrain(work, args.pretrain_steps, args.pretrain_batch_size, Path(args.cache))
        runs = {m: [finetune(m, base, work, args.steps, s, args.lr, args.lora_lr, args.batch_size, badam_interval)
                    for s in range(args.seeds)]
                for m in args.methods.split(",")}
        base_module = CausalLMModule(model_path=str(base), exact_match_batches=100, max_new_tokens=8)
        datamodule = data(work, ("sorting",), 2000, 0, args.batch_size)
        base_metrics = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(
            base_module, datamodule=datamodule, verbose=False)[0]
    summary = {"benchmark": "layer_sampling_quality", "pretrain_steps": args.pretrain_steps,
               "pretrain_batch_size": args.pretrain_batch_size,
               "batch_size": args.batch_size,
               "finetune_steps": args.steps, "seeds": args.seeds, "badam_interval": badam_interval,
               "pretrain_tasks": list(PRETRAIN_TASKS), "finetune_task": "sorting",
               "base_before_finetuning": {"exact_match": round(base_metrics["test/exact_match"], 4),
                                          "loss": round(base_metrics["test/loss"], 4)},
               "results": {m: {"exact_match_mean": round(statistics.mean(r["exact_match"] for r in rs), 4),
                               "loss_mean": round(statistics.mean(r["loss"] for r in rs), 4), "runs": rs}
                           for m, rs in runs.items()}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
