"""Training step time with and without ProgressiveLayerDrop at theta = theta_bar = 0.5 on a 12-block Llama.

Two copies of the same random-init model (one with the callback's block wrappers installed) train on the same
batches, alternating in rounds within one process. The schedule's decay is skipped (the draws use a step far past
the decay), so about 1 - (1 - 0.5)(L + 1) / (2L) = 73% of the blocks run. A third configuration with every block
skipped measures the time spent outside the blocks (embedding, head, loss, optimizer), which gives the expected
ratio ``(t_outside + f * (t_full - t_outside)) / t_full`` for the measured fraction ``f`` of blocks computed.

    python benchmarks/layer_drop_speed.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.layer_drop import ProgressiveLayerDrop  # noqa: E402

LATE_STEP = 10**9  # theta(t) = theta_bar: no decay left


def mlp_size(hidden: int) -> int:
    """Llama's MLP width: 2/3 of 4 x hidden, rounded up to a multiple of 256 (aligned for the GPU's matmul kernels)."""
    return 256 * -(-(8 * hidden // 3) // 256)


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                   intermediate_size=mlp_size(args.hidden), num_hidden_layers=args.layers,
                                   num_attention_heads=args.hidden // 64,
                                   num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq_len)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=getattr(torch, args.dtype)).train()


def timed_steps(model, optimizer, batches, before_step, device) -> float:
    """Seconds per optimizer step over ``batches``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for ids in batches:
        before_step()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a few minutes on a 2-core CPU)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="steps per configuration per round")
    parser.add_argument("--theta-bar", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and AdamW state")
    parser.add_argument("--fused-adamw", action="store_true",
                        help="AdamW's fused kernel (as Hugging Face's Trainer uses on a GPU) in every configuration")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps timings steady on a shared box)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 4, 5
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    models = {name: build(args, device) for name in ("baseline", "pld", "outside")}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=args.fused_adamw or None)
                  for name, m in models.items()}
    pld = ProgressiveLayerDrop(theta_bar=args.theta_bar, seed=0)
    pld.install(models["pld"])
    skip_all = ProgressiveLayerDrop(seed=0)
    skip_all.install(models["outside"])
    fractions: list[float] = []

    def draw() -> None:
        fractions.append(sum(pld.sample(LATE_STEP, args.layers)) / args.layers)

    def drop_everything() -> None:
        skip_all.probs, skip_all.keep = [1.0] * args.layers, [False] * args.layers

    hooks = {"baseline": lambda: None, "pld": draw, "outside": drop_everything}
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=gen).to(device)
               for _ in range(args.steps)]
    for name in models:  # warm-up (allocator, kernels, the one-off probe of the block output form)
        timed_steps(models[name], optimizers[name], batches[:2], hooks[name], device)
    fractions.clear()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name in models:
            times[name].append(timed_steps(models[name], optimizers[name], batches, hooks[name], device))

    t_base, t_pld, t_out = (statistics.median(times[n]) for n in ("baseline", "pld", "outside"))
    fraction = statistics.fmean(fractions)
    expected = (t_out + fraction * (t_base - t_out)) / t_base
    print(json.dumps({
        "benchmark": "layer_drop_speed", "device": str(device), "threads": args.threads, "layers": args.layers,
        "hidden": args.hidden, "seq_len": args.seq_len, "batch_size": args.batch_size, "dtype": args.dtype,
        "fused_adamw": args.fused_adamw, "theta": args.theta_bar, "fraction_computed": round(fraction, 4),
        "fraction_expected": round(sum(pld.keep_probabilities(LATE_STEP, args.layers)) / args.layers, 4),
        "step_s_baseline": round(t_base, 5), "step_s_pld": round(t_pld, 5), "step_s_outside_blocks": round(t_out, 5),
        "ratio": round(t_pld / t_base, 4), "expected_ratio": round(expected, 4),
        "expected_ratio_blocks_only": round(fraction, 4), "goal_ratio_at_most": 0.85,
        "steps_timed": args.rounds * args.steps,
    }))


if __name__ == "__main__":
    main()
