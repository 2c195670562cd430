"""NIH ChestX-ray14 as distributed: ``Data_Entry_2017.csv``, the official split lists, PNGs under ``images*/``."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import replace
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from datamodules.jsonl_records import DataError, read_utf8
from datamodules.phantom_cxr import NIH_LABELS, write_phantom_nih
from datamodules.xray_dataset import (
    RAND_AUGMENT,
    BadInput,
    XrayDataModule,
    XrayRecord,
    check_images,
    patient_split,
    remove_leaks,
)

CSV_NAME = "Data_Entry_2017.csv"
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
SPLIT_FILES = {"train_val": "train_val_list.txt", "test": "test_list.txt"}


def image_index(root: Path) -> dict[str, Path]:
    """Every PNG directly under ``root/images/`` or ``root/images_NNN/images/`` (or ``root/images_NNN/``), by name."""
    folders = [root / "images", *sorted(root.glob("images_*/images")), *sorted(root.glob("images_*"))]
    found: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for entry in os.scandir(folder):
                if entry.name.lower().endswith(".png") and entry.name not in found:
                    found[entry.name] = Path(entry.path)
    return found


def parse_finding_labels(text: str, where: str) -> list[float]:
    """The 14-label vector of a "Finding Labels" cell ("|"-separated; exactly "No Finding" = all zero)."""
    names = [n.strip() for n in text.split("|")]
    vector = [0.0] * len(NIH_LABELS)
    if names == ["No Finding"]:
        return vector
    for name in names:
        if name not in NIH_LABELS:
            hint = " ('No Finding' must stand alone)" if name == "No Finding" else ""
            raise DataError(f"{where}: unknown label {name!r}{hint}; expected 'No Finding' or '|'-separated labels "
                            f"from {list(NIH_LABELS)}")
        vector[NIH_LABELS.index(name)] = 1.0
    return vector


def read_data_entry(path: Path, images: dict[str, Path], bad: BadInput) -> dict[str, XrayRecord | None]:
    """Records by image name from ``Data_Entry_2017.csv`` (``None`` for a skipped row); images are checked later.

    A row without an image name or a patient ID, and an image listed twice with different labels or patients,
    go to ``bad``; a row repeated identically is read once.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: point root at the NIH ChestX-ray14 folder")
    records: dict[str, XrayRecord | None] = {}
    first: dict[str, XrayRecord] = {}
    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{path}: missing required column(s) {missing}; found {columns}")
    for lineno, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str | None)}
        name, where = row["Image Index"], f"{path}:{lineno}"
        if not name:
            bad("missing_name", f"{where}: the row has no Image Index")
            continue
        if not row["Patient ID"]:
            bad("missing_patient", f"{where}: image {name} has no Patient ID; the patient-disjoint split needs one")
            records[name] = None
            continue
        try:
            labels = parse_finding_labels(row["Finding Labels"], f"{where} (image {name})")
        except DataError as err:
            bad("unknown_label", str(err))
            records[name] = None
            continue
        record = XrayRecord(images.get(name, path.parent / "images" / name), labels, row["Patient ID"], where)
        if name in first:
            earlier = first[name]
            if (earlier.labels, earlier.patient) != (record.labels, record.patient):
                line = earlier.where.rsplit(":", 1)[1]
                bad("conflicting_duplicate", f"{where}: image {name} is listed again with other labels or patient "
                                             f"than at line {line} ({row['Finding Labels']!r}, patient "
                                             f"{record.patient!r}); which one is right?")
                records[name] = None
            continue
        first[name] = records[name] = record
    return records


def read_split_list(path: Path, records: dict[str, XrayRecord | None], bad: BadInput) -> list[XrayRecord]:
    """The records named in an official split list, in file order, each with ``where`` = its line in the list
    (rows already skipped are left out quietly; they were counted when skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the NIH folder ships train_val_list.txt and test_list.txt")
    out, seen = [], {}
    for lineno, line in enumerate(read_utf8(path).splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if name not in records:
            bad("not_in_csv", f"{path}:{lineno}: image {name!r} is listed in the split but absent from {CSV_NAME}")
            continue
        if name in seen:
            bad("duplicate_in_split", f"{path}:{lineno}: image {name!r} is listed again (first at line {seen[name]})")
            continue
        seen[name] = lineno
        if records[name] is not None:
            out.append(replace(records[name], where=f"{path}:{lineno}"))
    return out


class ChestXray14DataModule(XrayDataModule):
    """NIH ChestX-ray14 multi-label data (14 labels in the standard order) with a patient-disjoint val split.

    Args:
        root: the NIH folder (``Data_Entry_2017.csv``, ``train_val_list.txt``, ``test_list.txt``, ``images*/``).
            ``None`` writes the synthetic phantom set into a subfolder of ``phantom_dir`` keyed by its settings
            (written once, atomically; see ``datamodules.generated``) and reads it back through this loader.
        image_size: side of the network input in pixels.
        in_chans: 1 (gray) or 3 (gray replicated, as ImageNet-shaped checkpoints expect).
        mode: ``finetune`` (RandAugment) or ``pretrain`` (MAE crops; labels still returned).
        batch_size: per-device batch size.
        val_fraction: share of the train_val patients held out for validation.
        seed: seed of the patient split.
        skip_bad: skip (count and log) bad entries instead of raising: missing/unreadable image, unknown label,
            row without image name or patient ID, image listed twice with different labels (both rows dropped),
            image listed in a split but absent from the CSV or listed twice; test leakage (an image in both
            split lists, a patient with images on both sides) drops the training side's entries. A missing
            column is always an error.
        verify_images: check every image file at setup without decoding it (catches truncated or unreadable files
            early; otherwise only existence).
        rand_augment / crop_scale / mean / std: see ``datamodules.xray_transforms.build_xray_transform``.
        phantom_dir / phantom_patients / phantom_image_size: the generated set used when ``root`` is ``None``.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        in_chans: int = 1,
        mode: str = "finetune",
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        skip_bad: bool = False,
        verify_images: bool = True,
        rand_augment: str | None = RAND_AUGMENT,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        phantom_dir: str = "data/phantom_nih",
        phantom_patients: int = 120,
        phantom_image_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__(image_size, in_chans, mode, batch_size, num_workers, rand_augment, crop_scale, mean, std)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.label_names = list(NIH_LABELS)
        self.skipped: dict[str, int] = {}

    phantom_kind = "nih"
    write_phantom = staticmethod(write_phantom_nih)

    @property
    def data_root(self) -> Path:
        return Path(self.hparams.root) if self.hparams.root is not None else self.phantom_folder()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        root = self.data_root
        if not root.is_dir():
            raise FileNotFoundError(f"ChestX-ray14 folder {root} does not exist")
        bad = BadInput(hp.skip_bad)
        records = read_data_entry(root / CSV_NAME, image_index(root), bad)
        lists = {split: read_split_list(root / name, records, bad) for split, name in SPLIT_FILES.items()}
        lists["train_val"] = remove_leaks(lists["train_val"], lists["test"], bad)
        lists = {split: check_images(recs, bad, hp.verify_images) for split, recs in lists.items()}
        for split, recs in lists.items():
            if not recs:
                raise DataError(f"{root / SPLIT_FILES[split]}: no usable images in the {split} split")
        train, val = patient_split(lists["train_val"], hp.val_fraction, hp.seed)
        self.splits = {"train": train, "val": val, "test": lists["test"]}
        bad.warn(str(root))
        self.skipped = dict(bad.counts)
        rank_zero_info(f"ChestX-ray14 {root}: {len(train)} train / {len(val)} val / {len(lists['test'])} test images")
