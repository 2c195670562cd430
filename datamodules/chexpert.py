"""CheXpert (``train.csv`` / ``valid.csv`` with the ``Path`` prefix as shipped) with per-label uncertainty policies."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.jsonl_records import DataError, read_utf8
from datamodules.phantom_cxr import CHEXPERT_LABELS, write_phantom_chexpert
from datamodules.xray_dataset import (
    RAND_AUGMENT,
    BadInput,
    XrayDataModule,
    XrayRecord,
    check_images,
    label_coverage,
    patient_split,
    remove_leaks,
)

COMPETITION_LABELS = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
POLICIES = ("ones", "zeros", "ignore")
# The paper's code: U-Ones for Edema and Atelectasis, U-Zeros for everything else.
DEFAULT_POLICY = {"Edema": "ones", "Atelectasis": "ones"}
VIEW_COLUMN = "Frontal/Lateral"
_VALUES = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": -1.0, "-1": -1.0, "": 0.0}


def resolve_policy(labels: list[str], uncertainty: str | dict[str, str] | None) -> dict[str, str]:
    """Per-label policy: ``None`` = paper default; a string applies to all labels; a dict overrides the default."""
    if isinstance(uncertainty, str):
        policy = dict.fromkeys(labels, uncertainty)
    else:
        policy = {label: DEFAULT_POLICY.get(label, "zeros") for label in labels}
        for label, value in (uncertainty or {}).items():
            if label not in labels:
                raise ValueError(f"uncertainty names {label!r}, which is not one of the chosen labels {labels}")
            policy[label] = value
    bad = {k: v for k, v in policy.items() if v not in POLICIES}
    if bad:
        raise ValueError(f"Unknown uncertainty policy {bad}; expected one of {POLICIES}")
    return policy


def label_value(raw: str, policy: str) -> float:
    """1 / 0 / blank=0; uncertain (-1) -> 1 (``ones``), 0 (``zeros``) or -1 = masked out (``ignore``)."""
    value = _VALUES[raw]
    if value == -1.0:
        return {"ones": 1.0, "zeros": 0.0, "ignore": -1.0}[policy]
    return value


def resolve_image_path(root: Path, rel: str) -> Path:
    """``Path`` entries start with the dataset folder name (``CheXpert-v1.0-small/train/...``): resolve either way."""
    parts = Path(rel).parts
    if parts and parts[0] == root.name:
        return root.joinpath(*parts[1:])
    return root / rel


def read_chexpert_csv(path: Path, root: Path, labels: list[str], policy: dict[str, str], frontal_only: bool,
                      bad: BadInput) -> list[XrayRecord]:
    """Records of one CheXpert CSV with label vectors under ``policy``.

    Column names and the view (``Frontal``/``Lateral``) are matched case-insensitively. A row whose ``Path`` has
    no ``patientNNNNN`` folder, an unknown view or value, and a ``Path`` listed again with other labels go to
    ``bad``; a row repeated identically is read once.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: point root at the CheXpert folder holding train.csv/valid.csv")
    records: list[XrayRecord] = []
    first: dict[str, XrayRecord] = {}
    conflicting: set[str] = set()
    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
    found = [c.strip() for c in reader.fieldnames or []]
    canonical = {name.lower(): name for name in ["Path", VIEW_COLUMN, *labels]}
    columns = [canonical.get(c.lower(), c) for c in found]
    required = ["Path", *([VIEW_COLUMN] if frontal_only else []), *labels]
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path}: missing required column(s) {missing}; found {found}")
    for lineno, raw in enumerate(reader, start=2):
        row = {canonical.get((k or "").strip().lower(), (k or "").strip()): (v or "").strip()
               for k, v in raw.items() if isinstance(v, str | None)}
        where = f"{path}:{lineno}"
        if frontal_only:
            view = row[VIEW_COLUMN].lower()
            if view not in ("frontal", "lateral"):
                bad("bad_view", f"{where}: {VIEW_COLUMN} is {row[VIEW_COLUMN]!r}; expected Frontal or Lateral")
                continue
            if view != "frontal":
                continue
        unknown = [(label, row[label]) for label in labels if row[label] not in _VALUES]
        if unknown:
            bad("bad_value", f"{where}: value(s) {unknown} are not 1.0, 0.0, -1.0 (uncertain) or blank")
            continue
        match = re.search(r"patient\d+", row["Path"])
        if match is None:
            bad("missing_patient", f"{where}: Path {row['Path']!r} names no patient folder (patientNNNNN); the "
                                   "patient-disjoint split needs one")
            continue
        record = XrayRecord(resolve_image_path(root, row["Path"]),
                            [label_value(row[label], policy[label]) for label in labels], match.group(0), where)
        earlier = first.get(row["Path"])
        if earlier is None:
            first[row["Path"]] = record
            records.append(record)
        elif earlier.labels != record.labels and row["Path"] not in conflicting:
            conflicting.add(row["Path"])
            bad("conflicting_duplicate", f"{where}: {row['Path']} is listed again with other labels than at line "
                                         f"{earlier.where.rsplit(':', 1)[1]}; which one is right?")
    return [r for r in records if str(r.path) not in {str(resolve_image_path(root, p)) for p in conflicting}]


class CheXpertDataModule(XrayDataModule):
    """CheXpert multi-label data: train.csv split patient-disjointly into train/val, valid.csv as the test set.

    Args:
        root: the CheXpert folder (``CheXpert-v1.0-small`` or ``CheXpert-v1.0``) holding ``train.csv``/``valid.csv``.
            ``None`` writes the phantom set into a subfolder of ``phantom_dir`` keyed by its settings (written
            once, atomically) and reads it back through this loader.
        labels: observation columns; default the 5 competition labels, ``"all"`` for the 14 observations.
        uncertainty: ``None`` = the paper's default (U-Ones for Edema and Atelectasis, U-Zeros for the rest), one of
            ``ones``/``zeros``/``ignore`` for every label, or a dict label -> policy overriding the default.
            ``ignore`` gives target -1, which the loss and the AUROC leave out. Blank entries are 0.
        frontal_only: keep frontal views only (default, as in the paper).
        Other arguments: as ``ChestXray14DataModule``.
    """

    def __init__(
        self,
        root: str | None = None,
        labels: list[str] | str = COMPETITION_LABELS,
        uncertainty: str | dict[str, str] | None = None,
        frontal_only: bool = True,
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
        phantom_dir: str = "data/phantom_chexpert",
        phantom_patients: int = 120,
        phantom_image_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__(image_size, in_chans, mode, batch_size, num_workers, rand_augment, crop_scale, mean, std)
        names = list(CHEXPERT_LABELS) if labels == "all" else list(labels)
        unknown = [n for n in names if n not in CHEXPERT_LABELS]
        if unknown:
            raise ValueError(f"Unknown CheXpert labels {unknown}; expected names from {list(CHEXPERT_LABELS)} or 'all'")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.label_names = names
        self.policy = resolve_policy(names, uncertainty)
        self.skipped: dict[str, int] = {}
        self.label_report: dict[str, tuple[int, int, int]] = {}  # label -> training (positive, negative, ignored)

    phantom_kind = "chexpert"
    write_phantom = staticmethod(write_phantom_chexpert)

    @property
    def data_root(self) -> Path:
        hp = self.hparams
        return Path(hp.root) if hp.root is not None else self.phantom_folder() / "CheXpert-v1.0-small"

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        root = self.data_root
        if not root.is_dir():
            raise FileNotFoundError(f"CheXpert folder {root} does not exist")
        bad = BadInput(hp.skip_bad)
        read = {split: read_chexpert_csv(root / f"{split}.csv", root, self.label_names, self.policy, hp.frontal_only,
                                         bad) for split in ("train", "valid")}
        read["train"] = remove_leaks(read["train"], read["valid"], bad)
        read = {split: check_images(recs, bad, hp.verify_images) for split, recs in read.items()}
        for split, recs in read.items():
            if not recs:
                raise DataError(f"{root / (split + '.csv')}: no usable images")
        train, val = patient_split(read["train"], hp.val_fraction, hp.seed)
        self.splits = {"train": train, "val": val, "test": read["valid"]}
        self.label_report = label_coverage(train, self.label_names)
        unusable = {name: counts for name, counts in self.label_report.items() if counts[0] == 0 or counts[1] == 0}
        if unusable:
            rank_zero_warn(f"CheXpert {root}: label(s) with no positive or no negative training entry under the "
                           "uncertainty policy, so nothing can be learned for them: "
                           + "; ".join(f"{name} ({self.policy[name]}: {pos} positive, {neg} negative, {ign} ignored)"
                                       for name, (pos, neg, ign) in unusable.items())
                           + ". Choose another policy for them or leave them out of labels")
        bad.warn(str(root))
        self.skipped = dict(bad.counts)
        rank_zero_info(f"CheXpert {root}: {len(train)} train / {len(val)} val / {len(read['valid'])} test images")
