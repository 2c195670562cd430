"""Peak memory, optimizer-state bytes and step time of full FT, LoRA, LISA, OwLore, BAdam, one process per method.

    python benchmarks/layer_sampling_memory.py [--quick] [--device cuda --precision bf16-true]

Model: a random-init Llama with 32 blocks (as Llama-2-7B), hidden 512, MLP 1024, vocab 4000 (~88M parameters):
the smallest shape on a 2-core CPU where, as in a 7B model, the blocks hold ~95% of the weights and the fp32
AdamW state of full fine-tuning (8 bytes/parameter) dominates the activations. Each method runs in its own
process (so peak RSS is its own); memory is the peak RSS above the RSS after imports (CPU), or the CUDA peak.
With ``--same-process`` (what ``gpu_check.py`` uses) the methods run one after another in one process: on a GPU
each still gets its own CUDA peak; on the CPU the figure is only what a method adds to the earlier peak.
Methods: full fine-tuning (AdamW), LoRA r=8 on all linear layers (peft), LISA with 2 blocks (with and
without the embedding), OwLore with 2 blocks and GaLore rank hidden/16 (the 7B scripts' 256/4096), BAdam with
one block at a time and nothing else trainable (its optimizer state must be 8 bytes per parameter of the active
block). LISA and BAdam switch every 2 steps (every step with --quick), so a run has more than 10 switches.
Prints one JSON line: raw figures per method and ratios to full FT.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

METHODS = ("full", "lora", "lisa", "lisa_frozen_embedding", "owlore", "badam")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ratio(a: float, b: float, digits: int = 3) -> float | None:
    """a / b rounded, or None when b is 0 (a toy smoke run on the CPU can add nothing to its process's peak)."""
    return round(a / b, digits) if b else None


def worker(method: str, args: argparse.Namespace) -> dict:
    import lightning as L
    import torch
    import transformers
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks.badam import BAdam
    from callbacks.core.galore import GaLoreAdamW
    from callbacks.lisa import LISA, optimizer_state_bytes
    from callbacks.owlore import OwLore

    cuda = args.device == "cuda"
    if cuda:  # with --same-process, what an earlier method left allocated is in the base and not counted
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (CPU) an earlier method's peak
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    heads = args.heads or args.hidden // 64
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                                   num_hidden_layers=args.layers, num_attention_heads=heads,
                                   num_key_value_heads=args.kv_heads or heads, max_position_embeddings=args.seq,
                                   tie_word_embeddings=args.tie)
    torch.manual_seed(0)
    with torch.device(args.device):  # built where it trains, in the dtype it trains in (fast at 1B+ on a GPU)
        model = transformers.AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16 if args.precision == "bf16-true" else torch.float32)
    total_params = sum(p.numel() for p in model.parameters())
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                 target_modules="all-linear"))

    class Bench(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids, use_cache=False).logits

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0], use_cache=False).loss

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            if method == "owlore":
                return GaLoreAdamW(params, lr=1e-4, rank=args.hidden // 16, update_proj_gap=100, scale=1.0)
            return torch.optim.AdamW(params, lr=1e-4)

    sampler = None
    if method.startswith("lisa"):
        sampler = LISA(n_layers=2, interval=args.interval, train_embedding=method == "lisa")
    elif method == "badam":
        sampler = BAdam(interval=args.interval, order="descending")
    elif method == "owlore":
        sampler = OwLore(n_layers=2, interval=args.interval, calibration_batches=1)

    class Meter(L.Callback):
        def __init__(self):
            self.times, self.state, self.expected, self.active = [], [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            opt = trainer.optimizers[0]
            self.state.append(optimizer_state_bytes(opt))
            trainable = [p for p in pl_module.parameters() if p.requires_grad]
            # fp32 AdamW: two moments per trainable parameter (plus a 4-byte step counter per tensor)
            self.expected.append(8 * sum(p.numel() for p in trainable))
            self.active.append(tuple(sampler.active) if sampler else ())

    meter = Meter()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.steps * args.batch, args.seq), generator=gen)
    trainer = L.Trainer(max_steps=args.steps, accelerator=args.device, devices=1, precision=args.precision,
                        callbacks=[c for c in (sampler, meter) if c], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Bench(), DataLoader(TensorDataset(ids), batch_size=args.batch))
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:  # a process's peak RSS only grows: with --same-process, what this method added to the earlier peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if args.same_process:
            peak = base + max(peak - peak_before, 0)
    switches = sum(a != b for a, b in zip(meter.active, meter.active[1:], strict=False))
    return {
        "method": method, "params": total_params, "peak_memory_bytes": peak - base, "base_bytes": base,
        "optimizer_state_bytes": meter.state[-1], "optimizer_state_bytes_max": max(meter.state),
        "adamw_expected_bytes": meter.expected[-1], "switches": switches,
        "step_time_s": statistics.median(meter.times[args.warmup:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (still > 10 LISA switches)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--mlp", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 64)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: as many as heads)")
    parser.add_argument("--tie", action="store_true", help="tie the output head to the embedding (Llama-3.2)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-true on a GPU")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--same-process", action="store_true",
                        help="run the methods one after another in this process, saving a start per method; on "
                             "cuda each method's peak is its own (peak statistics reset, the base subtracted), on "
                             "the CPU only what it adds to the process's earlier peak RSS (a smoke run's figure)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:  # re-sample every step: 13 draws, still more than 10 switches
        args.steps, args.interval, args.warmup = 14, 1, 2
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return
    results = {}
    for method in args.methods.split(","):
        if args.same_process:
            results[method] = worker(method, args)
            print("RESULT " + json.dumps(results[method]), flush=True)  # a caller with a deadline keeps these
            continue
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", method]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
        results[method] = json.loads(lines[-1][len("RESULT "):])
        print(lines[-1], flush=True)
    full = results.get("full")
    summary = {"benchmark": "layer_sampling_memory", "device": args.device, "precision": args.precision,
               "model": f"llama L{args.layers} h{args.hidden} mlp{args.mlp} v{args.vocab}",
               "tokens_per_step": args.batch * args.seq, "steps": args.steps,
               "peak_memory": ("CUDA peak of each method" if args.device == "cuda" else
                               "growth of the shared process's peak RSS (a smoke figure)" if args.same_process else
                               "peak RSS of each method's own process"),
               "results": results}
    if full:
        summary["ratios_to_full"] = {m: {"peak_memory": ratio(r["peak_memory_bytes"], full["peak_memory_bytes"]),
                                         "optimizer_state": ratio(r["optimizer_state_bytes"],
                                                                  full["optimizer_state_bytes"]),
                                         "step_time": ratio(r["step_time_s"], full["step_time_s"])}
                                     for m, r in results.items()}
    for method in ("lisa", "badam"):  # BAdam: one block, 8 bytes per parameter plus a 4-byte step per tensor
        if method in results:
            summary[f"{method}_state_vs_adamw_expected"] = ratio(results[method]["optimizer_state_bytes_max"],
                                                                 results[method]["adamw_expected_bytes"], 4)
    if {"lisa_frozen_embedding", "lora"} <= results.keys():
        summary["lisa_frozen_embedding_peak_vs_lora"] = ratio(results["lisa_frozen_embedding"]["peak_memory_bytes"],
                                                              results["lora"]["peak_memory_bytes"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
