"""Training augmentation is a function of (sample, seed) alone: the same images with 0 or 2 workers, whatever
the global random state, and a run resumed mid-epoch with workers ends with the uninterrupted run's weights."""

import random
import time

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.run.exact_resume import ExactResume
from datamodules.chestxray14 import ChestXray14DataModule
from datamodules.xray_augment import RandAugment, sample_generator
from datamodules.xray_dataset import XrayDataset, XrayRecord
from datamodules.xray_transforms import build_xray_transform
from recipes.vit_classifier import ViTClassifierModule
from tests.conftest import TINY_VIT_KWARGS, write_nih
from tests.probe_callbacks import CrashAtStep

TINY = {**TINY_VIT_KWARGS, "depth": 2}


def _gradient_image(seed: int = 0):
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8)
    return Image.fromarray(arr, "L")


def _global_states():
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()


def test_augmentation_draws_from_its_generator_only():
    transform = build_xray_transform("finetune", 32)
    image = _gradient_image()
    outputs = []
    for salt in (1, 2):
        random.seed(salt)
        np.random.seed(salt)
        torch.manual_seed(salt)
        before = _global_states()
        outputs.append(torch.stack([transform(image, sample_generator(0, 0, k)) for k in range(12)]))
        assert _global_states() == before, "augmentation must not touch the global generators"
    assert torch.equal(outputs[0], outputs[1])
    assert len({tuple(x.flatten().tolist()) for x in outputs[0]}) == 12  # different samples, different images


def test_rand_augment_applies_each_operation_of_the_policy():
    from PIL import Image

    augment = RandAugment("rand-m9-mstd0.5-inc1-p1.0", {"translate_const": 14, "img_mean": 128})
    image = Image.fromarray(np.random.default_rng(0).integers(60, 180, (48, 48), dtype=np.uint8), "L")
    assert len(augment.ops) == 15
    for op in augment.ops:
        out = [augment._apply(op, image, sample_generator(k)) for k in range(4)]
        assert all(o.size == image.size and o.mode == "L" for o in out), op.name
        if op.name != "ColorIncreasing":  # saturation: nothing to change in a gray image
            assert any(o.tobytes() != image.tobytes() for o in out), f"{op.name} left the image as it was"


def test_rand_augment_refuses_an_operation_that_draws_from_global_state(monkeypatch):
    from timm.data import auto_augment

    monkeypatch.setattr(auto_augment, "_RAND_3A", ["GaussianBlurRand"])
    with pytest.raises(ValueError, match="GaussianBlurRand"):
        RandAugment("rand-m6-t3a", {"img_mean": 128})


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


def test_loading_from_threads_in_any_order_equals_loading_in_order(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40), dtype=np.uint8), "L").save(paths[-1])
    records = [XrayRecord(paths[i % 8], [0.0], str(i)) for i in range(192)]
    dataset = XrayDataset(records, build_xray_transform("finetune", 32))
    keys = [(i, (7, 2, i)) for i in range(192)]
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    before = _global_states()
    in_order = [dataset[key]["image"] for key in keys]
    assert _global_states() == before
    # a bystander draws from the global generators while 8 threads load in a shuffled order: neither disturbs
    # the other (the augmentation never seeds, reads or restores a process-wide generator)
    expected = [random.random() for _ in range(2000)], np.random.rand(2000).tolist()
    random.seed(0)
    np.random.seed(0)
    shuffled = list(range(192))
    random.Random(1).shuffle(shuffled)
    with ThreadPoolExecutor(9) as pool:
        bystander = pool.submit(lambda: [(random.random(), time.sleep(0) or float(np.random.rand()))
                                         for _ in range(2000)])
        threaded = dict(zip(shuffled, pool.map(lambda k: dataset[keys[k]]["image"], shuffled), strict=True))
        drawn = bystander.result()
    assert all(torch.equal(threaded[k], in_order[k]) for k in range(192))
    assert [d[0] for d in drawn] == expected[0] and [d[1] for d in drawn] == expected[1]
    assert len({tuple(x.flatten().tolist()) for x in in_order}) > 150  # the 8 files are augmented differently
