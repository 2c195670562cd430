"""Chest X-ray loaders: exact label vectors from hand-written rows, bad input, the phantom set, the image pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.chestxray14 import ChestXray14DataModule
from datamodules.chexpert import CheXpertDataModule
from datamodules.jsonl_records import DataError
from datamodules.phantom_cxr import NIH_COLUMNS, NIH_LABELS
from datamodules.xray_transforms import build_xray_transform, load_xray
from tests.conftest import CHEXPERT_HEADER, CHEXPERT_ROWS, NIH_ROWS, chexpert, nih, write_chexpert, write_nih, write_png


def vector(*names: str) -> list[float]:
    return [1.0 if n in names else 0.0 for n in NIH_LABELS]


def test_nih_label_vectors_and_patient_disjoint_split(tmp_path):
    dm = nih(write_nih(tmp_path))
    got = {r.path.name: r.labels for split in ("train", "val", "test") for r in dm.splits[split]}
    assert got == {"00000001_000.png": vector("Cardiomegaly", "Effusion"), "00000001_001.png": vector(),
                   "00000002_000.png": vector("Hernia"), "00000003_000.png": vector("Nodule", "Mass", "Pneumothorax"),
                   "00000004_000.png": vector(), "00000005_000.png": vector("Atelectasis")}
    assert [r.path.name for r in dm.splits["test"]] == ["00000005_000.png"]
    train_patients = {r.patient for r in dm.splits["train"]}
    val_patients = {r.patient for r in dm.splits["val"]}
    assert train_patients and val_patients and not train_patients & val_patients
    assert dm.splits["train"][0].path.parent.parent.name.startswith("images_00")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[1:] == (1, 32, 32) and batch["labels"].shape[1] == 14


@pytest.mark.parametrize("case,match", [
    ("missing_image", "00000002_000.png is missing"),
    ("unreadable_image", "00000002_000.png is unreadable"),
    ("unknown_label", "unknown label 'Covid'"),
    ("not_in_csv", "'00000099_000.png' is listed in the split but absent"),
])
def test_nih_bad_input_errors_or_is_skipped(tmp_path, case, match):
    rows = list(NIH_ROWS)
    extra = ()
    if case == "unknown_label":
        rows[2] = ("00000002_000.png", "Hernia|Covid", "2")
    if case == "not_in_csv":
        extra = ("00000099_000.png",)
    root = write_nih(tmp_path, rows=rows, extra_list=extra)
    image = root / "images_001" / "images" / "00000002_000.png"
    if case == "missing_image":
        image.unlink()
    if case == "unreadable_image":
        image.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=match):
        nih(root)
    with pytest.warns(UserWarning, match=rf"skipped 1 bad entries \{{'{case}': 1\}}"):
        dm = nih(root, skip_bad=True)
    assert dm.skipped == {case: 1}
    names = {r.path.name for split in dm.splits.values() for r in split}
    dropped = "00000099_000.png" if case == "not_in_csv" else "00000002_000.png"
    assert dropped not in names and len(names) == 6 - (case != "not_in_csv")


def test_nih_missing_column_is_an_error_naming_it(tmp_path):
    root = write_nih(tmp_path, columns=[c for c in NIH_COLUMNS if c != "Patient ID"])
    with pytest.raises(DataError, match=r"missing required column\(s\) \['Patient ID'\]"):
        nih(root, skip_bad=True)


def test_chexpert_label_vectors_default_policy(tmp_path):
    dm = chexpert(write_chexpert(tmp_path))
    assert dm.label_names == ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"]
    got = {str(r.path.relative_to(tmp_path)): r.labels for s in ("train", "val") for r in dm.splits[s]}
    prefix = "CheXpert-v1.0-small/train/"
    # U-Ones for Edema and Atelectasis, U-Zeros for the rest, blank = 0; the lateral view is left out.
    assert got == {prefix + "patient00001/study1/view1_frontal.jpg": [1.0, 1.0, 0.0, 1.0, 0.0],
                   prefix + "patient00002/study1/view1_frontal.jpg": [0.0, 1.0, 0.0, 0.0, 1.0],
                   prefix + "patient00003/study1/view1_frontal.jpg": [0.0, 0.0, 0.0, 0.0, 0.0],
                   prefix + "patient00004/study2/view1_frontal.jpg": [0.0, 0.0, 1.0, 1.0, 0.0]}
    assert len(dm.splits["test"]) == 4 and all("/valid/" in str(r.path) for r in dm.splits["test"])


def test_chexpert_ignore_policy_masks_and_lateral_option(tmp_path):
    dm = chexpert(write_chexpert(tmp_path), uncertainty={"Cardiomegaly": "ignore", "Edema": "zeros"},
                  frontal_only=False)
    got = {r.path.name + r.patient: r.labels for r in dm.splits["test"]}
    assert got["view1_frontal.jpgpatient90001"] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert got["view1_frontal.jpgpatient90002"] == [-1.0, 1.0, 0.0, 0.0, 1.0]
    assert "view2_lateral.jpgpatient90001" in got
    dm = chexpert(tmp_path / "CheXpert-v1.0-small", uncertainty="ignore", labels=["Edema"])
    assert sorted(r.labels[0] for r in dm.splits["test"]) == [-1.0, 0.0, 0.0, 1.0]


def test_chexpert_bad_input(tmp_path):
    with pytest.raises(DataError, match=r"missing required column\(s\) \['Edema'\]"):
        chexpert(write_chexpert(tmp_path / "a", header=[c for c in CHEXPERT_HEADER if c != "Edema"]))
    rows = [*CHEXPERT_ROWS[:2], (CHEXPERT_ROWS[2][0], "Frontal", ["2.0", "", "", "", ""]), *CHEXPERT_ROWS[3:]]
    root = write_chexpert(tmp_path / "b", rows=rows)
    with pytest.raises(DataError, match=r"train.csv:4: value\(s\) \[\('Cardiomegaly', '2.0'\)\]"):
        chexpert(root)
    with pytest.warns(UserWarning, match="skipped 2 bad entries"):
        assert chexpert(root, skip_bad=True).skipped == {"bad_value": 2}
    (root / "train" / CHEXPERT_ROWS[0][0]).unlink()
    with pytest.raises(DataError, match="view1_frontal.jpg is missing"):
        chexpert(root, skip_bad=False, uncertainty="zeros", labels=["Edema"])
    with pytest.raises(ValueError, match="Unknown uncertainty policy"):
        CheXpertDataModule(root=str(root), uncertainty="maybe")


def test_phantom_sets_load_through_the_real_loaders(tmp_path):
    dm = ChestXray14DataModule(phantom_dir=str(tmp_path / "nih"), phantom_patients=16, phantom_image_size=64,
                               image_size=32, batch_size=4)
    dm.prepare_data()
    dm.setup()
    assert dm.data_root.parent == tmp_path / "nih" and (dm.data_root / "images_001" / "images").is_dir()
    all_records = [r for s in dm.splits.values() for r in s]
    labels = torch.tensor([r.labels for r in all_records])
    present = {NIH_LABELS[i] for i in labels.sum(0).nonzero().flatten().tolist()}
    assert {"Cardiomegaly", "Effusion"} <= present and not present & {"Hernia", "Fibrosis", "Emphysema"}
    patients = [{r.patient for r in dm.splits[s]} for s in ("train", "val", "test")]
    assert all(patients) and not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert len(all_records) > len(set().union(*patients))  # several images per patient
    cx = CheXpertDataModule(phantom_dir=str(tmp_path / "cx"), phantom_patients=12, phantom_image_size=64,
                            image_size=32, batch_size=4)
    cx.prepare_data()
    cx.setup()
    batch = next(iter(cx.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["labels"].shape == (4, 5)


def test_image_pipeline_grayscale_once_and_modes(tmp_path):
    write_png(tmp_path / "gray.png", 60)
    write_png(tmp_path / "rgba.png", 60, mode="RGBA")
    Image.fromarray(np.asarray(Image.open(tmp_path / "gray.png")).astype(np.uint16) * 257).save(tmp_path / "w.png")
    gray = np.asarray(load_xray(tmp_path / "gray.png"))
    for other in ("rgba.png", "w.png"):
        img = load_xray(tmp_path / other)
        assert img.mode == "L" and np.array_equal(np.asarray(img), gray)
    eval1 = build_xray_transform("eval", 24, in_chans=1)(load_xray(tmp_path / "gray.png"))
    eval3 = build_xray_transform("eval", 24, in_chans=3)(load_xray(tmp_path / "gray.png"))
    assert eval1.shape == (1, 24, 24) and eval3.shape == (3, 24, 24)
    assert torch.allclose((eval3[0] * 0.229 + 0.485), (eval3[2] * 0.225 + 0.406), atol=1e-5)  # same gray
    for mode in ("pretrain", "finetune"):
        assert build_xray_transform(mode, 24)(load_xray(tmp_path / "gray.png")).shape == (1, 24, 24)
    with pytest.raises(DataError, match="missing.png does not exist"):
        load_xray(tmp_path / "missing.png")
