"""Training tokens/s and MFU of supervised fine-tuning with packing at a real model shape: full, LoRA and LISA, each
eager and compiled, through ``CausalLMModule`` and a plain ``lightning.Trainer``.

    python benchmarks/sft_throughput.py --layers 28 --hidden 3072 --mlp 8192 --vocab 128256 --heads 24 \\
        --kv-heads 8 --tie --device cuda          # Llama-3.2-3B shape (gpu_check.py's sft_throughput_3b)

Examples get the long-tailed lengths of ``packing_throughput.py`` (log-normal, median a quarter of ``max_length``)
and are packed into rows of ``max_length`` by ``datamodules.packing`` (position ids restarting per example); an
optimizer step takes ``rows x accumulation`` rows (8,192 token positions by default). Variants: ``full`` (AdamW on
every weight), ``lora`` (the module's ``lora`` setting, r 16 on all linear layers) and ``lisa`` (the ``LISA``
callback, 2 blocks), each also with ``_compile`` (``CausalLMModule(compile=True)``). Each variant runs
``warmup`` steps, then ``steps`` timed ones (median step time); it prints a ``RESULT`` line as it ends, so a caller
with a deadline keeps the finished ones, and one JSON line follows.

MFU is model FLOPs over the card's bf16 dense peak: 6 N per token (N the parameters that multiply, counted by
``callbacks.run.throughput.matmul_parameters`` as the dashboard's ``ThroughputLogger`` does, whatever is frozen)
plus attention, 12 x layers x hidden x n per token of an example of n tokens (PaLM's term, within each packed
example). The peak is ``callbacks.run.throughput.peak_flops``, the dashboard's (dense figures: 989 TFLOPS for an
H100 SXM or H200 in bf16); on the CPU there is no MFU (``null``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from packing_throughput import long_tailed_lengths  # noqa: E402

VARIANTS = ("full_compile", "full", "lisa", "lisa_compile", "lora", "lora_compile")  # the headline first


class ShapeTokenizer:
    """What building a random-init model reads of a tokenizer: its length (the vocabulary) and special ids."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab


def packed_batches(args: argparse.Namespace, count: int) -> list[dict]:
    """``count`` micro-batches of ``args.rows`` packed rows; each holds ``attention_flops`` (forward + backward)."""
    from datamodules.chat_encoding import IGNORE_INDEX
    from datamodules.packing import collate_packed, pack_rows

    g = torch.Generator().manual_seed(0)
    needed = count * args.rows
    lengths = long_tailed_lengths(4 * needed + 64, args.max_length, g)
    rows = pack_rows(lengths, args.max_length)
    if len(rows) < needed:
        raise ValueError(f"{len(rows)} packed rows, {needed} needed")
    order = torch.randperm(len(rows), generator=g)[:needed].tolist()
    batches = []
    for k in range(count):
        made, squares = [], 0
        for r in order[k * args.rows:(k + 1) * args.rows]:
            row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
            for n in (lengths[i] for i in rows[r]):
                ids = torch.randint(3, args.vocab, (n,), generator=g).tolist()
                row["input_ids"] += ids
                row["labels"] += [IGNORE_INDEX] + ids[1:]
                row["position_ids"] += list(range(n))
                squares += n * n
            made.append(row)
        batch = collate_packed(made, ShapeTokenizer.pad_token_id)
        batch["attention_flops"] = 12 * args.layers * args.hidden * squares
        batches.append(batch)
    return batches


def run_variant(name: str, args: argparse.Namespace, batches: list[dict], peak: float | None) -> dict:
    """Train ``warmup + steps`` optimizer steps of one variant; its step time, tokens/s, MFU and peak memory."""
    import lightning as L
    from torch.utils.data import DataLoader

    from callbacks.lisa import LISA
    from callbacks.run.throughput import matmul_parameters
    from recipes.causal_lm import CausalLMModule

    method, compiled = name.removesuffix("_compile"), name.endswith("_compile")
    kwargs: dict = {"lora": {"r": args.lora_rank, "alpha": 2 * args.lora_rank}} if method == "lora" else {}
    if compiled:
        kwargs["compile"] = True
    cuda = args.device == "cuda"
    if "torch._dynamo" in sys.modules:  # compiled code of an earlier variant holds on to its model
        torch._dynamo.reset()
    gc.collect()
    if cuda:  # what an earlier variant left allocated is in the base and not counted
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    config = {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": args.mlp,
              "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
              "num_key_value_heads": args.kv_heads, "max_position_embeddings": args.max_length,
              "tie_word_embeddings": args.tie}
    torch.manual_seed(0)
    module = CausalLMModule(model_config=config, warmup_steps=1, lr_schedule="constant",
                            optimizer=functools.partial(torch.optim.AdamW, lr=1e-5, fused=cuda or None), **kwargs)
    module.tokenizer = ShapeTokenizer(args.vocab)
    ends: list[float] = []

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepClock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.params = matmul_parameters(pl_module.model)
            self.attention = getattr(pl_module.model.config, "_attn_implementation", None)
            ends.append(now())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % args.accumulation == 0:
                ends.append(now())

    clock = StepClock()
    callbacks = [clock] + ([LISA(n_layers=2, interval=args.lisa_interval, seed=0)] if method == "lisa" else [])
    trainer = L.Trainer(max_steps=args.warmup + args.steps, accelerator=args.device, devices=1,
                        precision=args.precision, accumulate_grad_batches=args.accumulation, callbacks=callbacks,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    times = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    step = statistics.median(times[args.warmup:])
    timed = batches[args.warmup * args.accumulation:]
    per_step = args.steps
    tokens = sum(int(b["num_tokens"].sum()) for b in timed) / per_step
    flops = (6 * clock.params * tokens + sum(b["attention_flops"] for b in timed) / per_step)
    return {"variant": name, "method": method, "compile": compiled, "step_s": round(step, 4),
            "first_step_s": round(times[0], 2), "tokens_per_step": round(tokens),
            "tokens_per_s": round(tokens / step, 1), "model_flops_per_step": float(f"{flops:.4g}"),
            "mfu": round(flops / step / peak, 4) if peak else None, "matmul_params": clock.params,
            "attention": clock.attention,
            "peak_gb": round((torch.cuda.max_memory_allocated() - base) / 1e9, 2) if cuda else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--mlp", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--tie", action="store_true", help="tie the output head to the embedding (Llama-3.2)")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per packed row")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per micro-batch")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps (compilation happens here)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lisa-interval", type=int, default=3, help="LISA re-samples its blocks every this many")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="bf16-true")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the batches are made beforehand
    from callbacks.run.throughput import peak_flops

    peak = peak_flops(torch.device(args.device), torch.bfloat16)
    batches = packed_batches(args, (args.warmup + args.steps) * args.accumulation)
    results = {}
    for name in variants:
        results[name] = run_variant(name, args, batches, peak)
        print("RESULT " + json.dumps(results[name]), flush=True)
    summary = {"benchmark": "sft_throughput", "device": args.device,
               "card": torch.cuda.get_device_name() if args.device == "cuda" else None, "peak_flops": peak,
               "model": f"llama L{args.layers} h{args.hidden} mlp{args.mlp} v{args.vocab}",
               "max_length": args.max_length, "rows": args.rows, "accumulation": args.accumulation,
               "positions_per_step": args.max_length * args.rows * args.accumulation, "steps": args.steps,
               "results": results}
    for suffix in ("", "_compile"):
        lisa, full = results.get(f"lisa{suffix}", {}), results.get(f"full{suffix}", {})
        if "step_s" in lisa and "step_s" in full:
            summary[f"lisa_step_over_full{suffix}"] = round(lisa["step_s"] / full["step_s"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
