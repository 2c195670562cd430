"""Training tokens per second with packing (``data.packing: true``) against padded batches, on a long-tailed length
distribution like real instruction data (log-normal, median a quarter of ``max_length``).

Both configurations train the same random-init Llama with the same rows per step (8 rows of up to 512 tokens by
default; padded batches are as long as their longest example, packed rows hold up to ``max_length`` tokens),
through the recipes' own code: ``datamodules.packing`` makes the rows and ``CausalLMModule.lm_loss`` computes the
loss. They alternate in rounds within one process. ``ratio`` is packed over padded tokens (not padding) per
second; the goal is 1.8. Fewer rows per step pad less (4 rows: about 1.6).

    python benchmarks/packing_throughput.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.chat_encoding import IGNORE_INDEX, collate_examples  # noqa: E402
from datamodules.packing import PackedDataset, collate_packed  # noqa: E402
from datamodules.tokenizer import build_char_tokenizer  # noqa: E402
from recipes.causal_lm import CausalLMModule  # noqa: E402


def long_tailed_lengths(n: int, max_length: int, generator: torch.Generator) -> list[int]:
    """``n`` example lengths from a log-normal distribution with median ``max_length / 4``, within 8..max_length
    (the shape of real instruction data; ``gpu_check.py``'s SFT throughput check draws its examples here too)."""
    median = max_length / 4
    return (torch.randn(n, generator=generator) * 0.8).exp().mul(median).round().clamp(8, max_length).long().tolist()


def examples(n: int, max_length: int, vocab: int, seed: int):
    """``n`` examples (a ``datasets.Dataset``) of token ids below ``vocab`` with :func:`long_tailed_lengths`, a
    third of each masked as the prompt."""
    from datasets import Dataset  # imported here: the GPU machine's gpu_check imports this module without datasets

    g = torch.Generator().manual_seed(seed)
    lengths = long_tailed_lengths(n, max_length, g)
    ids = [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]
    labels = [[IGNORE_INDEX] * (k // 3) + x[k // 3:] for x, k in zip(ids, lengths, strict=True)]
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def batches(rows, collate, batch_size: int, count: int) -> list[dict]:
    return [collate([rows[i] for i in range(k * batch_size, (k + 1) * batch_size)], 0) for k in range(count)]


def tokens(batch: dict) -> int:
    return int((batch["num_tokens"] if "num_tokens" in batch else batch["attention_mask"]).sum())


def timed(module: CausalLMModule, optimizer, steps: list[dict]) -> float:
    """Seconds for the training steps of ``steps``."""
    start = time.perf_counter()
    for batch in steps:
        module.lm_loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about a minute on a 2-core CPU)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4, help="steps per configuration per round")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps timings steady on a shared box)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 3, 3
    torch.set_num_threads(args.threads)
    data = examples(4000, args.max_length, len(build_char_tokenizer()), seed=0)  # the module's tokenizer
    packed = PackedDataset(data, args.max_length)
    count = args.rounds * args.steps
    runs = {"padded": batches(data.shuffle(seed=0), collate_examples, args.batch_size, count),
            "packed": batches([packed[i] for i in torch.randperm(len(packed)).tolist()], collate_packed,
                              args.batch_size, count)}
    config = {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
              "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
              "num_key_value_heads": args.hidden // 64, "max_position_embeddings": args.max_length,
              "tie_word_embeddings": False}
    seconds = {name: [] for name in runs}
    for name in runs:  # one warm-up step each
        module, optimizer = build(config)
        timed(module, optimizer, runs[name][:1])
    models = {name: build(config) for name in runs}
    for r in range(args.rounds):
        for name, steps in runs.items():
            seconds[name].append(timed(*models[name], steps[r * args.steps:(r + 1) * args.steps]))
    rate = {name: sum(tokens(b) for b in runs[name]) / sum(seconds[name]) for name in runs}
    padding = {name: statistics.mean(1 - tokens(b) / b["input_ids"].numel() for b in runs[name]) for name in runs}
    print(json.dumps({"ratio": round(rate["packed"] / rate["padded"], 3),
                      "packed_tokens_per_s": round(rate["packed"], 1), "padded_tokens_per_s": round(rate["padded"], 1),
                      "packed_padding": round(padding["packed"], 3), "padded_padding": round(padding["padded"], 3),
                      "max_length": args.max_length, "batch_size": args.batch_size, "rounds": args.rounds,
                      "steps": args.steps}))


def build(config: dict) -> tuple[CausalLMModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = CausalLMModule(model_config=dict(config), tokenizer_name="char", loss_chunk_size=None)
    module.configure_model()
    module.train()
    return module, torch.optim.AdamW(module.parameters(), lr=1e-4)


if __name__ == "__main__":
    main()
