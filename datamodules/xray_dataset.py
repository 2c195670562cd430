"""What the chest X-ray data modules share: records, the dataset, bad-input bookkeeping, the patient split, loaders."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from datamodules.generated import generate_once, keyed_dir
from datamodules.jsonl_records import DataError
from datamodules.resumable_loader import data_loader
from datamodules.resumable_sampler import resumable_sampler
from datamodules.xray_augment import sample_generator
from datamodules.xray_transforms import RAND_AUGMENT, build_xray_transform, image_problem, load_xray


@dataclass
class XrayRecord:
    """One image: its file, its label vector (1 / 0, or -1 = ignored), its patient and where it was listed."""

    path: Path
    labels: list[float]
    patient: str
    where: str = ""


class XrayDataset(Dataset):
    """``{"image": (C, S, S) tensor, "labels": (K,) float tensor}`` per record."""

    def __init__(self, records: list[XrayRecord], transform: Callable) -> None:
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """``key`` is an index, or ``(index, entropy)`` from ``ResumableSampler(with_seeds=True)`` for training:
        the sample's augmentation then draws from its own generator seeded by ``entropy`` (seed, epoch, index)."""
        index, entropy = key if isinstance(key, tuple) else (key, None)
        record = self.records[index]
        rng = sample_generator(*entropy) if entropy is not None else None
        return {"image": self.transform(load_xray(record.path), rng),
                "labels": torch.tensor(record.labels, dtype=torch.float32)}


class BadInput:
    """Raises a ``DataError`` for each problem, or with ``skip=True`` counts it by kind and keeps a few examples."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.counts: dict[str, int] = {}
        self.examples: list[str] = []

    def __call__(self, kind: str, message: str) -> None:
        if not self.skip:
            raise DataError(f"{message} (pass skip_bad=True to skip such entries)")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(message)

    def warn(self, source: str) -> None:
        if self.counts:
            rank_zero_warn(f"{source}: skipped {sum(self.counts.values())} bad entries {self.counts}; e.g. "
                           + "; ".join(self.examples))


def check_images(records: list[XrayRecord], bad: BadInput, verify: bool) -> list[XrayRecord]:
    """Records whose image exists (and, with ``verify``, whose header reads); others go to ``bad``."""
    kept = []
    for record in records:
        problem = image_problem(record.path) if verify else (None if record.path.is_file() else "missing")
        if problem is None:
            kept.append(record)
        else:
            kind = "missing_image" if problem == "missing" else "unreadable_image"
            bad(kind, f"Image file {record.path} is {problem}")
    return kept


def remove_leaks(train: list[XrayRecord], test: list[XrayRecord], bad: BadInput) -> list[XrayRecord]:
    """``train`` without test leakage: an image in both lists, or an image of a patient who has test images, is a
    ``DataError`` naming both places; with ``skip_bad`` those training entries are dropped and counted."""
    test_images = {r.path: r for r in test}
    test_patients: dict[str, XrayRecord] = {}
    for record in test:
        test_patients.setdefault(record.patient, record)
    kept = []
    for record in train:
        if record.path in test_images:
            bad("leak_image", f"{record.where}: image {record.path.name} is also in the test split "
                              f"({test_images[record.path].where}); an image must be in one split only")
        elif record.patient in test_patients:
            bad("leak_patient", f"{record.where}: image {record.path.name} belongs to patient {record.patient!r}, "
                                f"who has test images too (e.g. {test_patients[record.patient].where}); a "
                                "patient's images must all be on one side")
        else:
            kept.append(record)
    return kept


def label_coverage(records: list[XrayRecord], names: list[str]) -> dict[str, tuple[int, int, int]]:
    """``label -> (positives, negatives, ignored)`` over ``records``."""
    out = {}
    for k, name in enumerate(names):
        values = [r.labels[k] for r in records]
        out[name] = (values.count(1.0), values.count(0.0), values.count(-1.0))
    return out


def patient_split(records: list[XrayRecord], val_fraction: float,
                  seed: int) -> tuple[list[XrayRecord], list[XrayRecord]]:
    """Seeded split by patient: no patient has images on both sides; ``val_fraction`` of the patients go to val."""
    patients = sorted({r.patient for r in records})
    if len(patients) < 2:
        raise DataError(f"Cannot carve a patient-disjoint validation split from {len(patients)} patient(s)")
    random.Random(seed).shuffle(patients)
    n_val = min(len(patients) - 1, max(1, math.ceil(val_fraction * len(patients))))
    val_patients = set(patients[:n_val])
    return [r for r in records if r.patient not in val_patients], [r for r in records if r.patient in val_patients]


class XrayDataModule(L.LightningDataModule):
    """Base of ``ChestXray14DataModule`` / ``CheXpertDataModule``: subclasses fill ``self.splits`` in ``setup``.

    Batches are ``{"image": (B, C, S, S), "labels": (B, K)}``; label entries ``-1`` are to be ignored.
    """

    def __init__(self, image_size: int, in_chans: int, mode: str, batch_size: int, num_workers: int,
                 rand_augment: str | None, crop_scale: tuple[float, float], mean: tuple[float, ...] | None,
                 std: tuple[float, ...] | None) -> None:
        super().__init__()
        if mode not in ("pretrain", "finetune"):
            raise ValueError(f"mode must be 'pretrain' (MAE crops) or 'finetune' (RandAugment), got {mode!r}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be positive and num_workers >= 0, got batch_size={batch_size}, "
                             f"num_workers={num_workers}")
        self.batch_size = batch_size
        self.label_names: list[str] = []
        self.splits: dict[str, list[XrayRecord]] = {}
        kwargs = {"image_size": image_size, "in_chans": in_chans, "mean": mean, "std": std}
        self.train_transform = build_xray_transform(mode, crop_scale=tuple(crop_scale), rand_augment=rand_augment,
                                                    **kwargs)
        self.eval_transform = build_xray_transform("eval", **kwargs)
        self.num_workers = num_workers

    # the generated phantom set used when ``root`` is None: its folder kind and writer (set by each subclass)
    phantom_kind: str
    write_phantom: Callable[..., object]

    def phantom_folder(self) -> Path:
        """The phantom set's folder under ``phantom_dir``, keyed by the settings that generate it."""
        return keyed_dir(self.hparams.phantom_dir, self.phantom_kind, self._phantom_key())

    def _phantom_key(self) -> dict:
        hp = self.hparams
        return {"n_patients": hp.phantom_patients, "image_size": hp.phantom_image_size, "seed": hp.seed}

    def prepare_data(self) -> None:
        """Write the phantom set once (atomically, shared by concurrent runs) when no ``root`` is given."""
        hp = self.hparams
        if hp.root is None:
            generate_once(hp.phantom_dir, self.phantom_kind, self._phantom_key(),
                          lambda folder: self.write_phantom(folder, n_patients=hp.phantom_patients,
                                                            image_size=hp.phantom_image_size, seed=hp.seed))

    def dataset(self, split: str) -> XrayDataset:
        if split not in self.splits:
            raise RuntimeError(f"No {split!r} split: call setup() first (have {sorted(self.splits)})")
        transform = self.train_transform if split == "train" else self.eval_transform
        return XrayDataset(self.splits[split], transform)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        # training order: seeded per epoch, identical on every rank, resumable mid-epoch
        sampler = resumable_sampler(dataset, self.trainer, self.batch_size, self.hparams.get("seed", 0),
                                    with_seeds=True) if shuffle else None
        return data_loader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                           drop_last=shuffle and len(self.splits[split]) > self.batch_size,
                           persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


__all__ = ["RAND_AUGMENT", "BadInput", "XrayDataModule", "XrayDataset", "XrayRecord", "check_images", "label_coverage",
           "patient_split", "remove_leaks"]
