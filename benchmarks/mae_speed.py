"""MAE pre-training step vs a full-token forward/backward of the same timm encoder, alternating in one process.

Prints one JSON line: median step times, their ratio, and the FLOP ratio expected for the mask ratio and the
decoder size (counted with ``torch.utils.flop_counter`` on the actual forward+backward, and from the usual
transformer formula ``24 N D^2 + 4 N^2 D`` per block). Run ``python benchmarks/mae_speed.py --quick`` on a CPU,
or without ``--quick`` (ViT-S/16 at 224 px, the paper's setting) on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.mae_pretrain import MAEPretrainModule  # noqa: E402
from recipes.parts.mae_masking import num_kept  # noqa: E402


def block_flops(tokens: int, dim: int, depth: int) -> float:
    """Forward FLOPs of ``depth`` pre-norm ViT blocks (MLP ratio 4): linears ``24 N D^2``, attention ``4 N^2 D``."""
    return depth * (24 * tokens * dim ** 2 + 4 * tokens ** 2 * dim)


def expected_ratio(mae: MAEPretrainModule) -> float:
    """Formula FLOP ratio MAE step / full-token step (backward ~ 2x forward on both sides cancels)."""
    enc, hp = mae.encoder, mae.hparams
    length = mae.grid[0] * mae.grid[1]
    prefix = enc.num_prefix_tokens
    patch_in = mae.patch_size ** 2 * hp.in_chans
    depth, dim = len(enc.blocks), enc.embed_dim
    embed = 2 * length * patch_in * dim
    full = embed + block_flops(length + prefix, dim, depth)
    visible = num_kept(length, hp.mask_ratio) + prefix
    decoder = (2 * visible * dim * hp.decoder_dim + block_flops(length + prefix, hp.decoder_dim, hp.decoder_depth)
               + 2 * length * hp.decoder_dim * patch_in)
    return (embed + block_flops(visible, dim, depth) + decoder) / full


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mask-ratio", type=float, default=0.9)
    parser.add_argument("--decoder-dim", type=int, default=512)
    parser.add_argument("--decoder-depth", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side (after 3 warm-up steps)")
    parser.add_argument("--quick", action="store_true", help="ViT-S/16 at 112 px, batch 8, 6 steps (CPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and images")
    args = parser.parse_args()
    if args.quick:
        args.img_size, args.batch, args.steps = 112, 8, 6
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    mae = MAEPretrainModule(model_name=args.model, img_size=args.img_size, in_chans=1, decoder_dim=args.decoder_dim,
                            decoder_depth=args.decoder_depth, mask_ratio=args.mask_ratio)
    dtype = getattr(torch, args.dtype)
    mae = mae.to(device, dtype)
    imgs = torch.randn(args.batch, 1, args.img_size, args.img_size, device=device, dtype=dtype)

    def mae_step() -> None:
        loss, _, _ = mae(imgs)
        loss.backward()

    def full_step() -> None:  # every token through the same encoder, as fine-tuning or a non-masked pre-training does
        mae.encoder.forward_features(imgs).float().pow(2).mean().backward()

    def timed(fn) -> float:
        mae.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):
        timed(mae_step)
        timed(full_step)
    mae_times, full_times = [], []
    for _ in range(args.steps):  # alternate, so drift in machine load hits both sides alike
        mae_times.append(timed(mae_step))
        full_times.append(timed(full_step))
    mae_flops, full_flops = counted_flops(mae_step), counted_flops(full_step)
    mae_s, full_s = statistics.median(mae_times), statistics.median(full_times)
    print(json.dumps({
        "benchmark": "mae_speed", "device": str(device), "dtype": args.dtype, "model": args.model,
        "img_size": args.img_size,
        "batch": args.batch, "mask_ratio": args.mask_ratio, "decoder": [args.decoder_dim, args.decoder_depth],
        "mae_step_s": round(mae_s, 5), "full_step_s": round(full_s, 5), "time_ratio": round(mae_s / full_s, 4),
        "speedup": round(full_s / mae_s, 3), "counted_flop_ratio": round(mae_flops / full_flops, 4),
        "formula_flop_ratio": round(expected_ratio(mae), 4), "mae_gflops": round(mae_flops / 1e9, 2),
        "full_gflops": round(full_flops / 1e9, 2), "steps": args.steps,
    }))


if __name__ == "__main__":
    main()
