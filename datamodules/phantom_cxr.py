"""Synthetic chest X-ray phantoms written in exactly the NIH ChestX-ray14 (and CheXpert) folder formats.

Each image is a frontal chest outline (body, two lungs with vessel markings, heart) with learnable findings:
- Cardiomegaly: a wide heart; Effusion: a fluid level with a meniscus blunting a lung base;
- Nodule: small round opacities; Mass: one large round opacity;
- Pneumothorax: a lateral lung region without markings, bounded by a thin pleural line;
- rarer: Atelectasis (a shrunken lung), Edema (bilateral haze), Consolidation (a dense patch), Infiltration (blots).
Other NIH labels never occur (their AUROC is undefined: a useful check of the metric). Several patients each have
several images (follow-ups) and a chronic tendency (e.g. a patient with a big heart keeps it), so a patient-disjoint
split matters. Position, size, contrast and noise vary per image.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

NIH_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
              "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NIH_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", "")
# Per-image prevalence of the drawn findings (the rest of the 14 labels never occur).
PREVALENCE = {"Cardiomegaly": 0.25, "Effusion": 0.2, "Nodule": 0.15, "Mass": 0.1, "Pneumothorax": 0.12,
              "Atelectasis": 0.06, "Infiltration": 0.05, "Edema": 0.04, "Consolidation": 0.05}
CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices")
# CheXpert observation -> phantom finding drawn for it.
CHEXPERT_FINDING = {"Cardiomegaly": "Cardiomegaly", "Edema": "Edema", "Consolidation": "Consolidation",
                    "Atelectasis": "Atelectasis", "Pleural Effusion": "Effusion", "Lung Lesion": "Nodule",
                    "Pneumothorax": "Pneumothorax"}
CHEXPERT_PREVALENCE = {"Cardiomegaly": 0.25, "Edema": 0.2, "Consolidation": 0.15, "Atelectasis": 0.2, "Effusion": 0.25,
                       "Nodule": 0.1, "Pneumothorax": 0.08}


def _sample_findings(rng: np.random.Generator, chronic: dict[str, float], prevalence: dict[str, float]) -> set[str]:
    found = {name for name, p in prevalence.items() if rng.random() < min(0.95, p * chronic.get(name, 1.0))}
    if "Mass" in found:
        found.discard("Nodule")
    return found


def draw_phantom(rng: np.random.Generator, size: int, findings: set[str], patient: dict[str, float]) -> np.ndarray:
    """One frontal phantom as a ``(size, size)`` uint8 array with the given findings drawn in."""
    s = size
    img = Image.new("L", (s, s), 12)
    draw = ImageDraw.Draw(img)
    dx, dy = rng.normal(0, 0.02, 2) * s
    scale = patient["scale"] * rng.uniform(0.97, 1.03)

    def box(cx: float, cy: float, rx: float, ry: float) -> tuple[float, float, float, float]:
        cx, cy = 0.5 + (cx - 0.5) * scale, 0.5 + (cy - 0.5) * scale
        x0, y0 = (cx - rx * scale) * s + dx, (cy - ry * scale) * s + dy
        return x0, y0, (cx + rx * scale) * s + dx, (cy + ry * scale) * s + dy

    draw.ellipse(box(0.5, 0.56, 0.43, 0.5), fill=135)
    lungs = Image.new("L", (s, s), 0)
    lung_draw = ImageDraw.Draw(lungs)
    lung_ry = {"left": 0.27, "right": 0.27}
    if "Atelectasis" in findings:
        lung_ry[rng.choice(["left", "right"])] = 0.16
    centers = {"right": 0.31, "left": 0.69}  # image left = patient's right
    for side, cx in centers.items():
        ry = lung_ry[side]
        lung_draw.ellipse(box(cx, 0.2 + ry, 0.14, ry), fill=255)
    # Lungs dark, with vessel markings branching from the hila.
    texture = Image.new("L", (s, s), 48)
    tex_draw = ImageDraw.Draw(texture)
    for side, cx in centers.items():
        hx, hy = box(cx + (0.08 if side == "right" else -0.08), 0.45, 0, 0)[:2]
        for _ in range(14):
            angle = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(0.08, 0.2) * s
            tex_draw.line([(hx, hy), (hx + np.cos(angle) * length, hy + np.sin(angle) * length)], fill=88,
                          width=max(1, s // 96))
    if "Pneumothorax" in findings:
        side = rng.choice(["left", "right"])
        cx = centers[side] + (-0.1 if side == "right" else 0.1)
        region = box(cx, 0.4, 0.12, 0.24)
        tex_draw.ellipse(region, fill=6)
        tex_draw.arc(region, 0, 360, fill=140, width=max(1, s // 64))
    img.paste(texture, (0, 0), lungs)
    if "Edema" in findings:
        haze = Image.new("L", (s, s), 0)
        ImageDraw.Draw(haze).ellipse(box(0.5, 0.42, 0.32, 0.22), fill=160)
        img.paste(Image.new("L", (s, s), 130), (0, 0), Image.fromarray(
            np.minimum(np.asarray(haze), np.asarray(lungs)).astype(np.uint8)).filter(ImageFilter.GaussianBlur(s / 20)))
    heart_rx, heart_ry = (0.22, 0.16) if "Cardiomegaly" in findings else (0.12, 0.12)
    heart_rx *= patient["heart"]
    draw.ellipse(box(0.55, 0.64, heart_rx, heart_ry), fill=175)
    if "Effusion" in findings:
        side = rng.choice(["left", "right"])
        level = rng.uniform(0.56, 0.64)
        fluid = Image.new("L", (s, s), 0)
        fluid_draw = ImageDraw.Draw(fluid)
        fluid_draw.rectangle(box(centers[side], (level + 0.9) / 2, 0.16, (0.9 - level) / 2), fill=255)
        fluid_draw.ellipse(box(centers[side], level, 0.16, 0.05), fill=255)  # meniscus
        mask = np.minimum(np.asarray(fluid), np.asarray(lungs)).astype(np.uint8)
        img.paste(Image.new("L", (s, s), 160), (0, 0), Image.fromarray(mask))
    if "Consolidation" in findings:
        cx = centers[rng.choice(["left", "right"])]
        patch = Image.new("L", (s, s), 0)
        ImageDraw.Draw(patch).ellipse(box(cx, 0.33, 0.12, 0.1), fill=255)
        mask = np.minimum(np.asarray(patch), np.asarray(lungs)).astype(np.uint8)
        img.paste(Image.new("L", (s, s), 145), (0, 0), Image.fromarray(mask).filter(ImageFilter.GaussianBlur(s / 64)))
    if "Infiltration" in findings:
        for _ in range(5):
            cx = centers[rng.choice(["left", "right"])] + rng.uniform(-0.08, 0.08)
            draw.ellipse(box(cx, rng.uniform(0.3, 0.55), 0.04, 0.03), fill=115)
    for name, count, radius in (("Nodule", int(rng.integers(2, 4)), 0.035), ("Mass", 1, 0.09)):
        if name in findings:
            for _ in range(count):
                cx = centers[rng.choice(["left", "right"])] + rng.uniform(-0.06, 0.06)
                draw.ellipse(box(cx, rng.uniform(0.3, 0.5), radius, radius), fill=185)
    img = img.filter(ImageFilter.GaussianBlur(max(0.5, s / 160)))
    arr = np.asarray(img, dtype=np.float64)
    arr = (arr - 90) * rng.uniform(0.85, 1.15) + 90 + rng.normal(0, 8) + rng.normal(0, 5, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _patients(n_patients: int, rng: np.random.Generator, max_images: int) -> list[dict]:
    out = []
    for pid in range(1, n_patients + 1):
        out.append({"id": pid, "images": int(rng.integers(1, max_images + 1)), "scale": rng.uniform(0.9, 1.05),
                    "heart": rng.uniform(0.9, 1.1), "age": int(rng.integers(20, 90)), "sex": rng.choice(["M", "F"]),
                    "chronic": {"Cardiomegaly": 3.0 if rng.random() < 0.25 else 0.3,
                                "Effusion": 2.0 if rng.random() < 0.3 else 0.6}})
    return out


def _up_to_date(root: Path, params: dict, marker: str) -> bool:
    path = root / marker
    return path.is_file() and json.loads(path.read_text()) == params


def write_phantom_nih(root: str | Path, n_patients: int = 120, image_size: int = 128, max_images: int = 6,
                      test_fraction: float = 0.2, files_per_folder: int = 200, seed: int = 0) -> Path:
    """Write an NIH ChestX-ray14-format phantom under ``root`` (skipped when the same one is already there).

    Layout: ``images_001/images/00000001_000.png`` ..., ``Data_Entry_2017.csv`` with the NIH columns,
    ``train_val_list.txt`` and ``test_list.txt`` (patient-disjoint, ``test_fraction`` of the patients).
    """
    root = Path(root)
    params = {"format": "nih", "n_patients": n_patients, "image_size": image_size, "max_images": max_images,
              "test_fraction": test_fraction, "files_per_folder": files_per_folder, "seed": seed}
    if _up_to_date(root, params, ".phantom.json"):
        return root
    rng = np.random.default_rng(seed)
    rows, split = [], {"train_val": [], "test": []}
    n_test = max(1, round(test_fraction * n_patients))
    test_ids = set(rng.permutation(np.arange(1, n_patients + 1))[:n_test].tolist())
    index = 0
    for patient in _patients(n_patients, rng, max_images):
        for follow_up in range(patient["images"]):
            findings = _sample_findings(rng, patient["chronic"], PREVALENCE)
            name = f"{patient['id']:08d}_{follow_up:03d}.png"
            folder = root / f"images_{index // files_per_folder + 1:03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(draw_phantom(rng, image_size, findings, patient), "L").save(folder / name)
            labels = "|".join(n for n in NIH_LABELS if n in findings) or "No Finding"
            view = "PA" if rng.random() < 0.7 else "AP"
            rows.append([name, labels, follow_up, patient["id"], patient["age"], patient["sex"], view, image_size,
                         image_size, 0.143, 0.143, ""])
            split["test" if patient["id"] in test_ids else "train_val"].append(name)
            index += 1
    with (root / "Data_Entry_2017.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(NIH_COLUMNS)
        writer.writerows(rows)
    for name, names in split.items():
        (root / f"{name}_list.txt").write_text("\n".join(names) + "\n")
    (root / ".phantom.json").write_text(json.dumps(params))
    return root


def _chexpert_value(rng: np.random.Generator, positive: bool, uncertain_p: float, blank_p: float) -> str:
    if rng.random() < uncertain_p:
        return "-1.0"
    if positive:
        return "1.0"
    return "" if rng.random() < blank_p else "0.0"


def write_phantom_chexpert(root: str | Path, n_patients: int = 120, image_size: int = 128, max_images: int = 4,
                           valid_fraction: float = 0.2, seed: int = 0,
                           folder_name: str = "CheXpert-v1.0-small") -> Path:
    """Write a CheXpert-format phantom: ``root/<folder_name>/{train,valid}.csv`` and JPEGs under ``train/``, ``valid/``.

    ``Path`` entries carry the ``<folder_name>/`` prefix as shipped. Training rows have uncertain (``-1.0``) and
    blank entries; validation rows only 0/1, as in the real set. About one image in six is a lateral view.
    Returns the dataset folder (``root/<folder_name>``).
    """
    base = Path(root) / folder_name
    params = {"format": "chexpert", "n_patients": n_patients, "image_size": image_size, "max_images": max_images,
              "valid_fraction": valid_fraction, "seed": seed}
    if _up_to_date(base, params, ".phantom.json"):
        return base
    rng = np.random.default_rng(seed + 1)
    n_valid = max(1, round(valid_fraction * n_patients))
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    rows: dict[str, list] = {"train": [], "valid": []}
    for patient in _patients(n_patients, rng, max_images):
        split = "valid" if patient["id"] <= n_valid else "train"
        for study in range(1, patient["images"] + 1):
            findings = _sample_findings(rng, patient["chronic"], CHEXPERT_PREVALENCE)
            lateral = rng.random() < 1 / 6
            rel = f"{split}/patient{patient['id']:05d}/study{study}/view{2 if lateral else 1}_" \
                  f"{'lateral' if lateral else 'frontal'}.jpg"
            arr = draw_phantom(rng, image_size, findings, patient)
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr.T if lateral else arr, "L").save(base / rel, quality=92)
            uncertain_p, blank_p = (0.0, 0.0) if split == "valid" else (0.08, 0.6)
            values = {}
            for label in CHEXPERT_LABELS:
                finding = CHEXPERT_FINDING.get(label)
                values[label] = "" if finding is None else _chexpert_value(rng, finding in findings, uncertain_p,
                                                                           blank_p)
            values["No Finding"] = "1.0" if not findings else ("" if split == "train" else "0.0")
            if split == "valid":
                values = {k: v or "0.0" for k, v in values.items()}
            rows[split].append([f"{folder_name}/{rel}", "Male" if patient["sex"] == "M" else "Female", patient["age"],
                                "Lateral" if lateral else "Frontal", "" if lateral else "PA",
                                *(values[label] for label in CHEXPERT_LABELS)])
    for split, split_rows in rows.items():
        with (base / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(split_rows)
    (base / ".phantom.json").write_text(json.dumps(params))
    return base
