"""CheXpert (``train.csv`` / ``valid.csv`` with the ``Path`` prefix as shipped) with per-label uncertainty policies."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from datamodules.generated import generate_once, keyed_dir
from datamodules.jsonl_records import DataError
from datamodules.phantom_cxr import CHEXPERT_LABELS, write_phantom_chexpert
from datamodules.xray_dataset import RAND_AUGMENT, BadInput, XrayDataModule, XrayRecord, check_images, patient_split

COMPETITION_LABELS = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
POLICIES = ("ones", "zeros", "ignore")
# The paper's code: U-Ones for Edema and Atelectasis, U-Zeros for everything else.
DEFAULT_POLICY = {"Edema": "ones", "Atelectasis": "ones"}
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
    """Records of one CheXpert CSV with label vectors under ``policy``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: point root at the CheXpert folder holding train.csv/valid.csv")
    records = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        required = ["Path", *(["Frontal/Lateral"] if frontal_only else []), *labels]
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(f"{path}: missing required column(s) {missing}; found {columns}")
        for lineno, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str | None)}
            where = f"{path}:{lineno}"
            if frontal_only and row["Frontal/Lateral"] != "Frontal":
                continue
            unknown = [(label, row[label]) for label in labels if row[label] not in _VALUES]
            if unknown:
                bad("bad_value", f"{where}: value(s) {unknown} are not 1.0, 0.0, -1.0 (uncertain) or blank")
                continue
            match = re.search(r"patient\d+", row["Path"])
            patient = match.group(0) if match else row["Path"]
            records.append(XrayRecord(resolve_image_path(root, row["Path"]),
                                      [label_value(row[label], policy[label]) for label in labels], patient))
    return records


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

    @property
    def data_root(self) -> Path:
        hp = self.hparams
        if hp.root is not None:
            return Path(hp.root)
        return keyed_dir(hp.phantom_dir, "chexpert", self._phantom_key()) / "CheXpert-v1.0-small"

    def _phantom_key(self) -> dict:
        hp = self.hparams
        return {"n_patients": hp.phantom_patients, "image_size": hp.phantom_image_size, "seed": hp.seed}

    def prepare_data(self) -> None:
        hp = self.hparams
        if hp.root is None:
            generate_once(hp.phantom_dir, "chexpert", self._phantom_key(),
                          lambda d: write_phantom_chexpert(d, n_patients=hp.phantom_patients,
                                                           image_size=hp.phantom_image_size, seed=hp.seed))

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
        read = {split: check_images(recs, bad, hp.verify_images) for split, recs in read.items()}
        for split, recs in read.items():
            if not recs:
                raise DataError(f"{root / (split + '.csv')}: no usable images")
        train, val = patient_split(read["train"], hp.val_fraction, hp.seed)
        self.splits = {"train": train, "val": val, "test": read["valid"]}
        bad.warn(str(root))
        self.skipped = dict(bad.counts)
        rank_zero_info(f"CheXpert {root}: {len(train)} train / {len(val)} val / {len(read['valid'])} test images")
