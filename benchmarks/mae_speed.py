"""MAE pre-training step vs the same model on every patch, and vs a fine-tuning step, alternating in one process.

Three steps (forward + backward) of one model on one batch: the MAE step (only the visible patches through the
encoder); the full-token MAE step, MAE's own baseline (the encoder on every patch, then the same decoder and a loss
over all patches: what the step costs without dropping the masked patches); and the fine-tuning step (the encoder on
every patch, no decoder). Prints one JSON line: median step times, the time ratio MAE / full-token MAE, images/s
of the MAE and fine-tuning steps, and the FLOP ratio (counted with ``torch.utils.flop_counter`` on the actual
forward+backward, and from the transformer formula ``24 N D^2 + 4 N^2 D`` per block). Run
``python benchmarks/mae_speed.py --quick`` on a CPU, or ``--model vit_base_patch16_224 --decoder-depth 8`` (the
chest X-ray paper's ViT-B) on a GPU. ``--compile`` also times the MAE and full-token MAE steps of the model built
with ``MAEPretrainModule(compile=True)`` (``"compiled"`` in the JSON line).
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
from recipes.parts.mae_masking import masked_mse, num_kept, patchify  # noqa: E402


def block_flops(tokens: int, dim: int, depth: int) -> float:
    """Forward FLOPs of ``depth`` pre-norm ViT blocks (MLP ratio 4): linears ``24 N D^2``, attention ``4 N^2 D``."""
    return depth * (24 * tokens * dim ** 2 + 4 * tokens ** 2 * dim)


def expected_ratio(mae: MAEPretrainModule) -> float:
    """Formula FLOP ratio MAE step / full-token MAE step (backward ~ 2x forward on both sides cancels)."""
    enc, hp = mae.encoder, mae.hparams
    length = mae.grid[0] * mae.grid[1]
    prefix = enc.num_prefix_tokens
    patch_in = mae.patch_size ** 2 * hp.in_chans
    depth, dim = len(enc.blocks), enc.embed_dim
    embed = 2 * length * patch_in * dim

    def encoder_decoder(visible: int) -> float:
        decoder = (2 * visible * dim * hp.decoder_dim + block_flops(length + prefix, hp.decoder_dim, hp.decoder_depth)
                   + 2 * length * hp.decoder_dim * patch_in)
        return embed + block_flops(visible, dim, depth) + decoder

    return encoder_decoder(num_kept(length, hp.mask_ratio) + prefix) / encoder_decoder(length + prefix)


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
    parser.add_argument("--compile", action="store_true", help="also time the steps of the compiled model")
    args = parser.parse_args()
    if args.quick:
        args.img_size, args.batch, args.steps = 112, 8, 6
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    mae = build(args, device, dtype)
    imgs = torch.randn(args.batch, 1, args.img_size, args.img_size, device=device, dtype=dtype)
    steps = step_functions(mae, imgs)
    secs = median_seconds(mae, steps, args.steps, device)
    flops = {name: counted_flops(fn) for name, fn in steps.items()}
    result = {
        "benchmark": "mae_speed", "device": str(device), "dtype": args.dtype, "model": args.model,
        "img_size": args.img_size, "batch": args.batch, "mask_ratio": args.mask_ratio,
        "decoder": [args.decoder_dim, args.decoder_depth],
        "mae_step_s": round(secs["mae"], 5), "full_token_step_s": round(secs["full_token"], 5),
        "finetune_step_s": round(secs["finetune"], 5),
        "time_ratio": round(secs["mae"] / secs["full_token"], 4),
        "mae_images_per_s": round(args.batch / secs["mae"], 1),
        "finetune_images_per_s": round(args.batch / secs["finetune"], 1),
        "counted_flop_ratio": round(flops["mae"] / flops["full_token"], 4),
        "formula_flop_ratio": round(expected_ratio(mae), 4),
        **{f"{name}_gflops": round(f / 1e9, 2) for name, f in flops.items()}, "steps": args.steps,
    }
    if args.compile:
        result["compiled"] = compiled_seconds(args, device, dtype, imgs)
    print(json.dumps(result))


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, **kwargs) -> MAEPretrainModule:
    """The MAE model in ``dtype`` on ``device`` (``configure_model`` called, as Lightning would)."""
    torch.manual_seed(0)
    mae = MAEPretrainModule(model_name=args.model, img_size=args.img_size, in_chans=1, decoder_dim=args.decoder_dim,
                            decoder_depth=args.decoder_depth, mask_ratio=args.mask_ratio, **kwargs)
    mae.configure_model()
    return mae.to(device, dtype)


def compiled_seconds(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, imgs: torch.Tensor) -> dict:
    """Median MAE and full-token MAE step times of the model built with ``compile=True``, and their ratio."""
    mae = build(args, device, dtype, compile=True)
    steps = step_functions(mae, imgs)
    del steps["finetune"]
    secs = median_seconds(mae, steps, args.steps, device)
    return {"variant": "compile", "mae_step_s": round(secs["mae"], 5),
            "full_token_step_s": round(secs["full_token"], 5), "time_ratio": round(secs["mae"] / secs["full_token"], 4),
            "mae_images_per_s": round(args.batch / secs["mae"], 1)}


def step_functions(mae: MAEPretrainModule, imgs: torch.Tensor) -> dict:
    """The three steps (forward + backward) of ``mae`` on ``imgs``, by name."""

    def mae_step() -> None:
        loss, _, _ = mae(imgs)
        loss.backward()

    def full_token_step() -> None:  # MAE's baseline: no patch dropped before the encoder, the loss on every patch
        latent, mask, ids_restore = mae.forward_encoder(imgs, 0.0)
        pred = mae.forward_decoder(latent, ids_restore)
        masked_mse(pred, patchify(imgs, mae.patch_size), torch.ones_like(mask)).backward()

    def finetune_step() -> None:  # every token through the encoder, no decoder: fine-tuning's forward and backward
        mae.encoder.forward_features(imgs).float().pow(2).mean().backward()

    return {"mae": mae_step, "full_token": full_token_step, "finetune": finetune_step}


def median_seconds(mae: MAEPretrainModule, steps: dict, count: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each step over ``count`` alternating rounds, after 3 warm-up rounds."""

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
        for fn in steps.values():
            timed(fn)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(count):  # alternate, so drift in machine load hits every step alike
        for name, fn in steps.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


if __name__ == "__main__":
    main()
