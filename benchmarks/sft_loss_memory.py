"""Peak host memory of one SFT loss + backward: ``CausalLMModule(loss_chunk_size=...)`` vs the plain loss.

A Llama-shaped model with the Llama-3 vocabulary (128,256) and a small hidden size, a batch of 2 x 2048 tokens
with every position labelled (the least favourable case for us: a prompt masked with -100 is not projected at all
by the chunked loss), on the CPU. The measured phase is ``module.lm_loss(batch)`` and its backward; the plain loss
is the Hugging Face one (full [B, S, V] logits, upcast to fp32). Each variant runs in its own child process
(peak = ``ru_maxrss``), alternating; the losses and gradients are compared. Prints one JSON line.

    python benchmarks/sft_loss_memory.py [--batch 2 --seq 2048 --vocab 128256 --chunk 1024 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from peak_memory import phase_report, phase_start, run_child  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from recipes.causal_lm import CausalLMModule  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--chunk", type=int, default=1024, help="loss_chunk_size of ours")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["chunked", "plain"], default=None)
    p.add_argument("--save", default=None, help="(child) where to save the loss and gradients")
    return p.parse_args(argv)


def child(args) -> None:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=args.vocab, hidden_size=args.hidden,
                               intermediate_size=4 * args.hidden, num_hidden_layers=args.layers, num_attention_heads=2,
                               num_key_value_heads=1, tie_word_embeddings=False, max_position_embeddings=args.seq)
    module = CausalLMModule(model_config={"model_type": "llama"},
                            loss_chunk_size=args.chunk if args.child == "chunked" else None)
    module.model = AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    phase_start()
    loss = module.lm_loss(batch)
    loss.backward()
    report = phase_report(variant=args.child)
    torch.save({"loss": loss.detach(), "grads": {k: p.grad for k, p in module.named_parameters()}}, args.save)
    print(report)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.child:
        child(args)
        return {}
    shape = ["--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab), "--hidden",
             str(args.hidden), "--layers", str(args.layers), "--chunk", str(args.chunk)]
    runs: dict[str, list[dict]] = {"chunked": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for variant in (("chunked", "plain") if rep % 2 == 0 else ("plain", "chunked")):
                runs[variant].append(run_child(__file__, [*shape, "--child", variant, "--save",
                                                          f"{tmp}/{variant}.pt"]))
        a, b = torch.load(f"{tmp}/chunked.pt"), torch.load(f"{tmp}/plain.pt")
    grad_diff = max(float((a["grads"][k] - b["grads"][k]).abs().max()) for k in b["grads"])
    loss_diff = float((a["loss"] - b["loss"]).abs())
    ours = max(r["phase_peak_mb"] for r in runs["chunked"])
    base = min(r["phase_peak_mb"] for r in runs["plain"])
    line = {"benchmark": "sft_loss_memory", "batch": args.batch, "seq": args.seq, "vocab": args.vocab,
            "hidden": args.hidden, "loss_chunk_size": args.chunk, "ours_phase_peak_mb": ours,
            "plain_phase_peak_mb": base, "ratio": round(ours / base, 3),
            "ours_seconds": min(r["seconds"] for r in runs["chunked"]),
            "plain_seconds": min(r["seconds"] for r in runs["plain"]),
            "max_abs_diff": {"loss": float(f"{loss_diff:.3g}"), "grad": float(f"{grad_diff:.3g}")},
            "equal_1e-5": loss_diff <= 1e-5 and grad_diff <= 1e-5, "runs": runs, "device": "cpu",
            "torch": torch.__version__}
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
