"""Chest X-ray data integrity: test leakage, conflicting or incomplete rows, CheXpert views and label coverage,
high-bit-depth PNGs scaled by their real bit depth, and damaged files or lists named in the error."""

import csv

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from datamodules.jsonl_records import DataError
from datamodules.xray_transforms import bit_depth, load_xray
from tests.conftest import (
    CHEXPERT_HEADER,
    CHEXPERT_ROWS,
    NIH_ROWS,
    chexpert,
    nih,
    write_chexpert,
    write_nih,
    write_png,
)

CSV = "Data_Entry_2017.csv"


def _append_csv_row(root, name, labels, patient):
    with (root / CSV).open("a", newline="") as f:
        header = next(csv.reader((root / CSV).open()))
        full = {"Image Index": name, "Finding Labels": labels, "Patient ID": patient, "View Position": "PA"}
        csv.writer(f).writerow([full.get(c, "0") for c in header])


def _names(dm, split):
    return {r.path.name for r in dm.splits[split]}


def test_image_in_both_split_lists_is_a_leak(tmp_path):
    root = write_nih(tmp_path, extra_list=("00000005_000.png",))  # 00000005_000 is the test image
    with pytest.raises(DataError, match=r"train_val_list.txt:6: image 00000005_000.png is also in the test split "
                                        r"\(.*test_list.txt:1\)"):
        nih(root)
    with pytest.warns(UserWarning, match="leak_image"):
        dm = nih(root, skip_bad=True)
    assert dm.skipped == {"leak_image": 1}
    assert _names(dm, "test") == {"00000005_000.png"}
    assert "00000005_000.png" not in _names(dm, "train") | _names(dm, "val")


def test_patient_on_both_sides_is_a_leak(tmp_path):
    rows = [*NIH_ROWS, ("00000005_001.png", "No Finding", "5"), ("00000005_002.png", "Mass", "5")]
    root = write_nih(tmp_path, rows=rows)  # patient 5: one test image, two train_val images
    with pytest.raises(DataError, match=r"train_val_list.txt:6: image 00000005_001.png belongs to patient '5', who "
                                        r"has test images too \(e.g. .*test_list.txt:1\)"):
        nih(root)
    with pytest.warns(UserWarning, match="leak_patient"):
        dm = nih(root, skip_bad=True)
    assert dm.skipped == {"leak_patient": 2}
    assert not {r.patient for r in dm.splits["train"] + dm.splits["val"]} & {"5"}


def test_duplicate_row_with_other_labels_and_row_without_patient(tmp_path):
    root = write_nih(tmp_path)
    _append_csv_row(root, "00000001_000.png", "Cardiomegaly|Effusion", "1")  # identical repeat: read once
    _append_csv_row(root, "00000002_000.png", "No Finding", "2")  # other labels than line 4
    with pytest.raises(DataError, match=rf"{CSV}:9: image 00000002_000.png is listed again with other labels or "
                                        r"patient than at line 4"):
        nih(root)
    with pytest.warns(UserWarning, match="conflicting_duplicate"):
        dm = nih(root, skip_bad=True)
    assert dm.skipped == {"conflicting_duplicate": 1}
    assert "00000002_000.png" not in _names(dm, "train") | _names(dm, "val")
    assert sum(r.path.name == "00000001_000.png" for r in dm.splits["train"] + dm.splits["val"]) == 1

    rows = [*NIH_ROWS[:3], (NIH_ROWS[3][0], NIH_ROWS[3][1], ""), *NIH_ROWS[4:]]
    root = write_nih(tmp_path / "b", rows=rows)
    with pytest.raises(DataError, match=rf"{CSV}:5: image 00000003_000.png has no Patient ID"):
        nih(root)
    with pytest.warns(UserWarning, match="missing_patient"):
        assert nih(root, skip_bad=True).skipped == {"missing_patient": 1}


def test_non_utf8_csv_names_file_and_line(tmp_path):
    root = write_nih(tmp_path)
    data = (root / CSV).read_bytes().replace(b"Hernia", b"Hern\xefa")
    (root / CSV).write_bytes(data)
    with pytest.raises(DataError, match=rf"{CSV}:4: not valid UTF-8 \(byte 0xef"):
        nih(root)


def _chexpert_rows(view_of_first="Frontal", path_of_last=None):
    rows = [(CHEXPERT_ROWS[0][0], view_of_first, CHEXPERT_ROWS[0][2]), *CHEXPERT_ROWS[1:]]
    if path_of_last:
        rows[-1] = (path_of_last, "Frontal", CHEXPERT_ROWS[-1][2])
    return rows


@pytest.mark.parametrize("view", ["frontal", "FRONTAL", " Frontal "])
def test_chexpert_view_is_matched_case_insensitively(tmp_path, view):
    dm = chexpert(write_chexpert(tmp_path, rows=_chexpert_rows(view)))
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 4  # the three other frontal rows and this one


def test_chexpert_bad_view_missing_patient_and_leaks(tmp_path):
    with pytest.raises(DataError, match=r"train.csv:2: Frontal/Lateral is 'AP'; expected Frontal or Lateral"):
        chexpert(write_chexpert(tmp_path / "a", rows=_chexpert_rows("AP")))
    root = write_chexpert(tmp_path / "b", rows=_chexpert_rows(path_of_last="nobody/study2/view1_frontal.jpg"))
    with pytest.raises(DataError, match=r"train.csv:6: Path 'CheXpert-v1.0-small/train/nobody/study2/"
                                        r"view1_frontal.jpg' names no patient folder"):
        chexpert(root)
    root = write_chexpert(tmp_path / "c")
    valid = root / "valid.csv"
    valid.write_text(valid.read_text().replace("valid/patient90003", "valid/patient00003"))
    write_png(root / "valid" / CHEXPERT_ROWS[3][0])
    with pytest.raises(DataError, match=r"train.csv:5: image view1_frontal.jpg belongs to patient 'patient00003', "
                                        r"who has test images too \(e.g. .*valid.csv:5\)"):
        chexpert(root)
    with pytest.warns(UserWarning, match="leak_patient"):
        assert chexpert(root, skip_bad=True).skipped == {"leak_patient": 1}


def test_chexpert_duplicate_path_with_other_labels(tmp_path):
    rows = [*CHEXPERT_ROWS, (CHEXPERT_ROWS[2][0], "Frontal", ["1.0", "1.0", "", "", "1.0"])]
    root = write_chexpert(tmp_path, rows=rows)
    with pytest.raises(DataError, match=r"train.csv:7: .*patient00002/study1/view1_frontal.jpg is listed again with "
                                        r"other labels than at line 4"):
        chexpert(root)


def test_label_without_usable_training_entry_is_reported(tmp_path):
    rows = [(rel, view, ["-1.0" if v == "1.0" else v for v in values[:1]] + values[1:])
            for rel, view, values in CHEXPERT_ROWS]  # Cardiomegaly: positives only as uncertain
    root = write_chexpert(tmp_path, rows=rows)
    with pytest.warns(UserWarning, match=r"Cardiomegaly \(ignore: 0 positive, \d negative, \d ignored\)"):
        dm = chexpert(root, report_coverage=True, uncertainty="ignore")
    positives, negatives, ignored = dm.label_report["Cardiomegaly"]
    assert positives == 0 and positives + negatives + ignored == len(dm.splits["train"])
    assert chexpert(root, uncertainty="ones").label_report["Cardiomegaly"][0] > 0


def _png16(path, arr, sbit=None):
    info = PngImagePlugin.PngInfo()
    if sbit:
        info.add(b"sBIT", bytes([sbit]))
    Image.fromarray(arr.astype(np.uint16)).save(path, pnginfo=info)
    return path


def test_16bit_png_scaled_by_its_real_bit_depth(tmp_path):
    ramp12 = np.arange(4096).reshape(64, 64)
    out = np.asarray(load_xray(_png16(tmp_path / "r12.png", ramp12)))
    assert len(np.unique(out)) == 256 and out.max() == 255
    assert np.array_equal(out, np.rint(ramp12 * 255 / 4095).astype(np.uint8))
    ramp10 = np.arange(1024).reshape(32, 32)
    assert np.array_equal(np.asarray(load_xray(_png16(tmp_path / "r10.png", ramp10))),
                          np.rint(ramp10 * 255 / 1023).astype(np.uint8))
    dark = np.full((8, 8), 1000)  # a dark 12-bit image that says so (sBIT = 12) keeps its darkness
    assert np.asarray(load_xray(_png16(tmp_path / "d.png", dark, sbit=12))).max() == round(1000 * 255 / 4095)
    assert bit_depth(np.array([70000]), tmp_path / "r12.png") == 17
    full = np.array([[0, 65535]])
    assert np.asarray(load_xray(_png16(tmp_path / "f.png", full))).tolist() == [[0, 255]]


IMAGE = "00000002_000.png"


def _nih_image(root):
    return next(root.rglob(IMAGE))


def _truncate(root):
    path = _nih_image(root)
    path.write_bytes(path.read_bytes()[:-40])


def _float_mode(root):
    """The name the CSV expects, with 32-bit float pixels (TIFF content behind the .png name)."""
    Image.fromarray(np.full((40, 40), 0.5, dtype=np.float32), "F").save(_nih_image(root), format="TIFF")


def _rewrite_csv(root, transform):
    path = root / CSV
    rows = list(csv.reader(path.open()))
    path.write_text("".join(line + "\n" for line in transform(rows)))


def _append_line(path, line):
    path.write_text(path.read_text() + line + "\n")


NIH_BAD_FILES = {  # a change to a valid NIH folder, and the error it must give
    "truncated_png": (_truncate, rf"{IMAGE} is unreadable"),
    "float_image_mode": (_float_mode, rf"{IMAGE} is unreadable \(mode 'F'"),
    "csv_missing_column": (lambda r: _rewrite_csv(r, lambda rows: [",".join(x[:1] + x[2:]) for x in rows]),
                           rf"{CSV}.*Finding Labels"),
    "csv_bad_delimiter": (lambda r: _rewrite_csv(r, lambda rows: [";".join(x) for x in rows]),
                          rf"{CSV}.*(column|Image Index)"),
    "empty_test_split": (lambda r: (r / "test_list.txt").write_text("\n"), r"test_list.txt.*(empty|no )"),
    "missing_split_file": (lambda r: (r / "test_list.txt").unlink(), r"test_list.txt"),
    "image_listed_twice_in_split": (lambda r: _append_line(r / "train_val_list.txt", "00000002_000.png"),
                                    r"train_val_list.txt:6: image '00000002_000.png' is listed again"),
}


@pytest.mark.parametrize("case", sorted(NIH_BAD_FILES))
def test_nih_bad_input(case, tmp_path):
    corrupt, pattern = NIH_BAD_FILES[case]
    root = write_nih(tmp_path / "nih")
    corrupt(root)
    with pytest.raises((DataError, FileNotFoundError), match=pattern):
        nih(root)


def test_chexpert_missing_path_column_is_named(tmp_path):
    with pytest.raises(DataError, match=r"train.csv.*'Path'"):
        chexpert(write_chexpert(tmp_path / "cx", header=[c for c in CHEXPERT_HEADER if c != "Path"]))
