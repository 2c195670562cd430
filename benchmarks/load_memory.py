"""Peak host memory while loading a ~1B-parameter bf16 checkpoint through ``build_causal_lm`` in bf16.

Builds a random-init model at the Llama-3.2-1B shape (1.24 B parameters, vocabulary 128,256, tied embedding),
saves it in bf16 (safetensors) to a temporary directory, then loads it in child processes the way the recipes do
(``recipes.parts.hf_model.build_causal_lm`` with the training dtype: bf16 under ``bf16-true``), alternating with a
load in fp32 (what ``bf16-mixed``'s fp32 master weights need) for reference. The figure is the growth of the
peak resident memory over the load and one read of every weight (weights mapped from the file count once they
are paged in; ``ru_maxrss`` minus the memory after imports) divided by the checkpoint's bytes. Prints one JSON line.

    python benchmarks/load_memory.py [--layers 16 --hidden 2048 --repeats 2]
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

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["save", *DTYPES], default=None)
    p.add_argument("--dir", default=None, help="(child) checkpoint directory")
    return p.parse_args(argv)


def save(args) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=args.vocab, hidden_size=args.hidden,
                               intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                               num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                               tie_word_embeddings=True, max_position_embeddings=2048)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(args.dir)
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))


def load(args) -> None:
    from datamodules.tokenizer import build_char_tokenizer
    from recipes.parts.hf_model import build_causal_lm

    tokenizer = build_char_tokenizer()
    phase_start()
    model = build_causal_lm(args.dir, None, tokenizer, dtype=DTYPES[args.child])
    # read every weight once, so that weights mapped from the file (not yet paged in) count as resident
    touched = sum(float(p.detach().sum()) for p in model.parameters())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    print(phase_report(variant=args.child, dtypes=dtypes, checksum_finite=touched == touched))


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.child == "save":
        save(args)
        return {}
    if args.child:
        load(args)
        return {}
    shape = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
             "--vocab", str(args.vocab)]
    runs: dict[str, list[dict]] = {"bf16": [], "fp32": []}
    with tempfile.TemporaryDirectory() as tmp:
        params = run_child(__file__, [*shape, "--child", "save", "--dir", tmp])["parameters"]
        size_mb = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) / 2**20
        for rep in range(args.repeats):
            for variant in (("bf16", "fp32") if rep % 2 == 0 else ("fp32", "bf16")):
                runs[variant].append(run_child(__file__, [*shape, "--child", variant, "--dir", tmp]))
    ours = max(r["phase_peak_mb"] for r in runs["bf16"])
    fp32 = min(r["phase_peak_mb"] for r in runs["fp32"])
    line = {"benchmark": "load_memory", "parameters": params, "checkpoint_mb": round(size_mb, 1),
            "bf16_load_phase_peak_mb": ours, "ratio_to_checkpoint": round(ours / size_mb, 3),
            "fp32_load_phase_peak_mb": fp32, "fp32_ratio_to_checkpoint": round(fp32 / size_mb, 3),
            "bf16_load_dtypes": runs["bf16"][0]["dtypes"], "runs": runs, "device": "cpu", "torch": torch.__version__}
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
