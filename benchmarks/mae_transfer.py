"""In-domain MAE pre-training vs scratch, fine-tuned on few labelled phantom X-rays (arXiv 2210.12843's claim).

One MAE pre-training on the unlabelled training images of the NIH-format phantom set, then for each seed two
fine-tunings on the same few labelled images: from the MAE encoder and from random init. Prints one JSON line
with the test macro AUROC of each run, the means and the difference, whichever way it goes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.chestxray14 import ChestXray14DataModule  # noqa: E402
from recipes.mae_pretrain import MAEPretrainModule  # noqa: E402
from recipes.vit_classifier import ViTClassifierModule  # noqa: E402

MODEL = "vit_tiny_patch16_224"


def trainer(epochs: int, root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root), **kwargs)


def labelled_subset(dm: ChestXray14DataModule, n_images: int, seed: int) -> None:
    """Keep ``n_images`` training images (whole patients, seeded); the val and test splits stay as they are."""
    patients = sorted({r.patient for r in dm.splits["train"]})
    random.Random(seed).shuffle(patients)
    kept = []
    for patient in patients:
        if len(kept) >= n_images:
            break
        kept += [r for r in dm.splits["train"] if r.patient == patient]
    dm.splits["train"] = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=300, help="phantom patients (about 3.5 images each)")
    parser.add_argument("--labelled", type=int, default=64, help="labelled training images for fine-tuning")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--pre-epochs", type=int, default=60)
    parser.add_argument("--ft-epochs", type=int, default=40)
    parser.add_argument("--mask-ratio", type=float, default=0.9)
    parser.add_argument("--quick", action="store_true", help="150 patients, 32 px, patch 4, 20+25 epochs (CPU)")
    parser.add_argument("--data-dir", default=None, help="where the phantom set goes (default: a temporary folder)")
    args = parser.parse_args()
    if args.quick:
        args.patients, args.img_size, args.patch, args.dim, args.pre_epochs, args.ft_epochs = 150, 32, 4, 64, 20, 25
    start = time.time()
    work = Path(args.data_dir or tempfile.mkdtemp(prefix="mae_transfer_"))
    kwargs = {"patch_size": args.patch, "embed_dim": args.dim, "depth": args.depth, "num_heads": 4}
    data = {"phantom_dir": str(work / "nih"), "phantom_patients": args.patients,
            "phantom_image_size": 2 * args.img_size, "image_size": args.img_size, "batch_size": 32,
            "crop_scale": (0.8, 1.0)}

    L.seed_everything(0)
    mae = MAEPretrainModule(model_name=MODEL, img_size=args.img_size, model_kwargs=kwargs, decoder_dim=64,
                            decoder_depth=2, decoder_heads=4, mask_ratio=args.mask_ratio, lr=1.5e-3, warmup_steps=20,
                            export_encoder=False)
    pre_data = ChestXray14DataModule(mode="pretrain", **data)
    pre = trainer(args.pre_epochs, work, limit_val_batches=0)
    pre.fit(mae, datamodule=pre_data)
    encoder = mae.export_encoder_to(work / "encoder.pth")
    pre_images = len(pre_data.splits["train"])

    results: dict[str, list[float]] = {"mae": [], "scratch": []}
    for seed in range(args.seeds):
        for init in ("mae", "scratch"):
            L.seed_everything(seed)
            dm = ChestXray14DataModule(rand_augment=None, seed=0, **data)
            dm.prepare_data()
            dm.setup()
            labelled_subset(dm, args.labelled, seed)
            model = ViTClassifierModule(model_name=MODEL, img_size=args.img_size, model_kwargs=kwargs,
                                        init_from=str(encoder) if init == "mae" else None, lr=1e-3, layer_decay=0.75,
                                        warmup_steps=5, drop_path_rate=0.1, auroc_table=False)
            run = trainer(args.ft_epochs, work, limit_val_batches=0)
            run.fit(model, datamodule=dm)
            run.test(model, datamodule=dm, verbose=False)
            results[init].append(round(float(run.callback_metrics["test/auroc_macro"]), 4))
    mae_mean, scratch_mean = statistics.mean(results["mae"]), statistics.mean(results["scratch"])
    print(json.dumps({
        "benchmark": "mae_transfer", "labelled_images": args.labelled, "pretrain_images": pre_images,
        "test_images": len(dm.splits["test"]), "img_size": args.img_size, "model": {"name": MODEL, **kwargs},
        "mask_ratio": args.mask_ratio, "pre_epochs": args.pre_epochs, "ft_epochs": args.ft_epochs,
        "auroc_macro_mae": results["mae"], "auroc_macro_scratch": results["scratch"],
        "mean_mae": round(mae_mean, 4), "mean_scratch": round(scratch_mean, 4),
        "mae_minus_scratch": round(mae_mean - scratch_mean, 4), "seconds": round(time.time() - start, 1),
    }))


if __name__ == "__main__":
    main()
