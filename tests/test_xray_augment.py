"""Training augmentation is a function of (sample, seed) alone: the same images with 0 or 2 workers, whatever
the global random state, and a run resumed mid-epoch with workers ends with the uninterrupted run's weights."""

import random

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.run.exact_resume import ExactResume
from datamodules.chestxray14 import ChestXray14DataModule
from datamodules.resumable_sampler import apply_seeded, seeded_rng
from datamodules.xray_transforms import build_xray_transform
from recipes.vit_classifier import ViTClassifierModule
from tests.conftest import TINY_VIT_KWARGS, write_nih
from tests.probe_callbacks import CrashAtStep

TINY = {**TINY_VIT_KWARGS, "depth": 2}


def _gradient_image(seed: int = 0):
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8)
    return Image.fromarray(arr, "L")


def test_seeded_transform_ignores_and_keeps_every_global_generator():
    transform = build_xray_transform("finetune", 32)
    image = _gradient_image()
    outputs = []
    for salt in (1, 2):
        random.seed(salt)
        np.random.seed(salt)
        torch.manual_seed(salt)
        before = (random.random(), np.random.random(), torch.rand(1).item())
        random.seed(salt)
        np.random.seed(salt)
        torch.manual_seed(salt)
        outputs.append(torch.stack([apply_seeded(transform, image, seed) for seed in range(12)]))
        after = (random.random(), np.random.random(), torch.rand(1).item())
        assert after == before, "a seeded transform must leave the global generators where they were"
    assert torch.equal(outputs[0], outputs[1])
    assert len({tuple(x.flatten().tolist()) for x in outputs[0]}) == 12  # different seeds, different images


def test_numpy_draws_inside_seeded_block_depend_on_the_seed_only():
    np.random.seed(5)
    with seeded_rng(7):
        a = np.random.choice(100, 5)
    np.random.seed(6)
    with seeded_rng(7):
        b = np.random.choice(100, 5)
    with seeded_rng(8):
        c = np.random.choice(100, 5)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def _train_images(root, workers: int) -> torch.Tensor:
    dm = ChestXray14DataModule(root=str(root), image_size=32, batch_size=2, val_fraction=0.2, mode="finetune",
                               num_workers=workers)
    dm.setup()
    return torch.cat([batch["image"] for batch in dm.train_dataloader()])


def test_finetune_images_do_not_depend_on_the_number_of_workers(tmp_path):
    rows = [(f"{i:08d}_000.png", "No Finding", str(i)) for i in range(1, 11)]
    root = write_nih(tmp_path / "nih", rows=rows, test=(rows[-1][0],))
    for i, (name, _, _) in enumerate(rows):  # distinct images, so a reordering or a different draw shows
        _gradient_image(i).save(next(root.rglob(name)))
    np.random.seed(0)
    single = _train_images(root, 0)
    np.random.seed(1)
    with_workers = _train_images(root, 2)
    assert single.shape[0] >= 6 and torch.equal(single, with_workers)


def _fit(root, data_dir, max_steps, ckpt_path=None, crash_at=None):
    L.seed_everything(3)
    data = ChestXray14DataModule(phantom_dir=str(data_dir), phantom_patients=16, phantom_image_size=48,
                                 image_size=32, batch_size=4, num_workers=2, mode="finetune")
    module = ViTClassifierModule(model_name="vit_tiny_patch16_224", img_size=32, model_kwargs=TINY, warmup_steps=2,
                                 auroc_table=False)
    callbacks = [ExactResume(), ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1)]
    if crash_at:
        callbacks.append(CrashAtStep(crash_at))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module.model.state_dict()


@pytest.mark.slow
def test_resume_with_workers_matches_uninterrupted_run(tmp_path):
    full = _fit(tmp_path / "full", tmp_path / "data", 6)
    with pytest.raises(SystemError, match="simulated crash"):
        _fit(tmp_path / "cut", tmp_path / "data", 6, crash_at=3)
    resumed = _fit(tmp_path / "resumed", tmp_path / "data", 6, ckpt_path=tmp_path / "cut/ckpt/epoch=0-step=3.ckpt")
    for name, value in full.items():
        assert torch.equal(value, resumed[name]), name


def test_seeded_augmentation_from_threads_equals_loading_in_order():
    import random
    import time
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    def transform(_):
        first = torch.rand(1).item()
        time.sleep(0.001)  # let another thread run in between
        return first, random.random(), float(np.random.rand())

    in_order = [apply_seeded(transform, None, seed) for seed in range(32)]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda seed: apply_seeded(transform, None, seed), range(32)))
    assert threaded == in_order
