"""Completion tokens per second of GRPO's rollout engines (``generate``, ``generate_static``, ``paged``), alternating.

One random-init model (the small Llama of ``sft.yaml`` unless ``--hidden`` / ``--layers`` say otherwise), ``--prompts``
prompts of different lengths x ``--G`` completions of up to ``--max_new_tokens`` tokens, sampled at temperature 1
through ``recipes.grpo.engines.sample_completions`` (the function ``GRPOModule`` calls); each engine's completion
tokens (up to and including EOS) over its wall time, summed over ``--rounds`` alternating rounds after one warm-up
call each. The greedy completions of every engine are compared with ``generate``'s first. Prints one JSON line.

    python benchmarks/rollout_engines.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from recipes.grpo.engines import ENGINES, sample_completions, sampling_settings  # noqa: E402
from recipes.parts.hf_model import DEFAULT_MODEL_CONFIG  # noqa: E402

VOCAB, EOS, PAD = 256, 2, 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and prompts (about a minute on 2 CPU cores)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=DEFAULT_MODEL_CONFIG["hidden_size"])
    p.add_argument("--layers", type=int, default=DEFAULT_MODEL_CONFIG["num_hidden_layers"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.rounds = 8, 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.manual_seed(0)
    cfg = {**DEFAULT_MODEL_CONFIG, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
           "intermediate_size": 3 * args.hidden, "max_position_embeddings": 64 + args.max_new_tokens}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg, vocab_size=VOCAB))
    model.to(args.device).train()
    tok = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)
    lengths = [8 + (17 * i) % 41 for i in range(args.prompts)]  # 8 to 48 tokens, left-padded
    ids = torch.full((args.prompts, max(lengths)), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, -n:] = torch.randint(3, VOCAB, (n,))
        mask[i, -n:] = 1
    ids, mask = ids.to(args.device), mask.to(args.device)

    def rollout(engine: str, greedy: bool = False) -> torch.Tensor:
        completion, cmask = sample_completions(model, tok, ids, mask, args.G, args.max_new_tokens,
                                               sampling_settings(1.0, 1.0, greedy), engine=engine)
        return completion if greedy else cmask

    reference = rollout("generate", greedy=True)
    result = {"benchmark": "rollout_engines", "device": str(args.device), "prompts": args.prompts, "G": args.G,
              "max_new_tokens": args.max_new_tokens, "hidden": args.hidden, "layers": args.layers,
              "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
              "greedy_equal": all(torch.equal(rollout(e, greedy=True), reference) for e in ENGINES[1:])}
    totals = {engine: [0.0, 0.0] for engine in ENGINES}
    for r in range(args.rounds):
        for engine in ENGINES if r % 2 == 0 else ENGINES[::-1]:
            torch.manual_seed(r)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = float(rollout(engine).sum())
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            totals[engine][0] += tokens
            totals[engine][1] += time.perf_counter() - start
    for engine, (tokens, seconds) in totals.items():
        result[f"{engine}_tokens_per_s"] = round(tokens / seconds, 1)
    result["ratio_paged_over_generate"] = round(result["paged_tokens_per_s"] / result["generate_tokens_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
