"""The one image pipeline of the chest X-ray data modules: load as 8-bit grayscale once, augment, tensorize.

Modes:
- ``pretrain`` (MAE): RandomResizedCrop(scale 0.5-1.0) + horizontal flip (arXiv 2210.12843).
- ``finetune``: RandomResizedCrop(scale 0.5-1.0) + flip + RandAugment ``rand-m6-mstd0.5-inc1`` (timm's policy
  string and operations, the paper's; no mixup/cutmix).
- ``eval``: resize the short side to ``image_size / crop_pct`` and center crop ``image_size``.

Every image becomes one gray channel first (RGB/RGBA PNGs and 16-bit PNGs included; high bit depths are scaled
by their real bit depth, see :func:`load_xray`); with ``in_chans=3`` the
gray channel is replicated after augmentation, as the paper's code does for ImageNet-shaped encoders.

The random steps draw from a generator passed per call (``transform(image, rng)``, see
``datamodules.xray_augment``), never from a process-wide one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from datamodules.jsonl_records import DataError
from datamodules.xray_augment import RandAugment, RandomHorizontalFlip, RandomResizedCrop

Mode = Literal["pretrain", "finetune", "eval"]
RAND_AUGMENT = "rand-m6-mstd0.5-inc1"
# ImageNet statistics (3 channels) and their channel means (1 channel), the normalization of the paper's code.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)


# Modes an X-ray file may come in (gray, 16-bit gray, or gray stored as RGB/palette); anything else is refused.
IMAGE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L")


STANDARD_BIT_DEPTHS = (8, 10, 12, 14, 16)


def png_significant_bits(path: str | Path) -> int | None:
    """The gray channel's significant bits from a PNG's ``sBIT`` chunk (``None`` without one or for non-PNGs)."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"sBIT":
                data = f.read(length)
                return data[0] if data else None
            if kind in (b"IDAT", b"IEND"):
                return None
            f.seek(length + 4, 1)  # chunk data and CRC


def bit_depth(arr: np.ndarray, path: str | Path) -> int:
    """The real bit depth of a high-bit-depth gray image: the PNG ``sBIT`` chunk when it covers the pixel values,
    else the smallest of 8/10/12/14/16 bits (or more, for 32-bit images) that holds the largest value."""
    top = int(arr.max()) if arr.size else 0
    declared = png_significant_bits(path)
    if declared and top < 2**declared:
        return declared
    needed = max(1, top.bit_length())
    return next((b for b in STANDARD_BIT_DEPTHS if needed <= b), needed)


def load_xray(path: str | Path) -> Image.Image:
    """Open an X-ray as an 8-bit single-channel ``L`` image; a missing or unreadable file is a ``DataError``.

    16-bit (and 32-bit integer) images are scaled by their real bit depth (:func:`bit_depth`), so 12-bit data in
    a 16-bit PNG spans the full 0-255 range instead of its bottom 16 grey levels: ``round(v / (2**bits - 1) * 255)``.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in IMAGE_MODES:
                raise DataError(f"Image file {path} has mode {im.mode!r}; expected a gray (L, I;16), RGB or palette "
                                "image")
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im).astype(np.int64)
                if arr.size and arr.min() < 0:
                    raise DataError(f"Image file {path} has negative pixel values (min {arr.min()}); expected a "
                                    "gray image with values from 0")
                top = 2 ** bit_depth(arr, path) - 1
                return Image.fromarray(np.rint(arr * (255.0 / top)).astype(np.uint8), "L")
            return im.convert("L")
    except FileNotFoundError as err:
        raise DataError(f"Image file {path} does not exist") from err
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"Image file {path} is unreadable: {err}") from err


def image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used (``missing`` / ``unreadable: ...``), or ``None``.

    Reads the file without decoding the pixels (``verify`` checks the structure and checksums, so a truncated PNG is
    caught here rather than hours into training).
    """
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            if im.mode not in IMAGE_MODES:
                return f"unreadable (mode {im.mode!r}; expected a gray, RGB or palette image)"
            im.verify()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f"unreadable ({err})"
    return None


class _ToChannels:
    """``(1, H, W)`` gray tensor to ``in_chans`` channels."""

    def __init__(self, in_chans: int) -> None:
        self.in_chans = in_chans

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.in_chans == 1 else x.expand(self.in_chans, -1, -1).contiguous()


class XrayTransform:
    """Gray PIL image to a normalized tensor: the random ``augment`` steps, each ``step(image, rng)``, then the
    fixed ``finish`` steps (resize/crop for eval, tensorize, channels, normalize).

    ``transform(image, rng)`` draws every random choice from ``rng`` (a ``numpy.random.Generator``), so the result
    depends on the image and the generator only. Without ``rng`` one is seeded from torch's global generator,
    so unseeded use stays reproducible under ``seed_everything`` (the training loaders always pass one).
    """

    def __init__(self, augment: list, finish: list) -> None:
        self.augment, self.finish = augment, T.Compose(finish)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        if self.augment and rng is None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        for step in self.augment:
            image = step(image, rng)
        return self.finish(image)

    def __repr__(self) -> str:
        return f"XrayTransform(augment={self.augment}, finish={self.finish})"


def build_xray_transform(mode: Mode, image_size: int = 224, in_chans: int = 1,
                         crop_scale: tuple[float, float] = (0.5, 1.0),
                         rand_augment: str | None = RAND_AUGMENT, crop_pct: float = 0.875,
                         mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> XrayTransform:
    """The transform of one mode, from a grayscale PIL image to a normalized ``(in_chans, S, S)`` tensor.

    Args:
        mode: ``pretrain``, ``finetune`` or ``eval``.
        image_size: output side in pixels.
        in_chans: 1 (gray) or 3 (gray replicated).
        crop_scale: RandomResizedCrop area range of the training modes (paper: 0.5-1.0).
        rand_augment: timm RandAugment policy string for ``finetune``; ``None`` disables it.
        crop_pct: eval center crop as a share of the resized short side.
        mean / std: normalization; default ImageNet statistics (their channel mean for one channel).
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if mode not in ("pretrain", "finetune", "eval"):
        raise ValueError(f"mode must be 'pretrain', 'finetune' or 'eval', got {mode!r}")
    mean = tuple(mean) if mean is not None else (GRAY_MEAN if in_chans == 1 else IMAGENET_MEAN)
    std = tuple(std) if std is not None else (GRAY_STD if in_chans == 1 else IMAGENET_STD)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean/std need {in_chans} value(s), got {mean} / {std}")
    bicubic = T.InterpolationMode.BICUBIC
    augment: list = []
    if mode == "eval":
        finish = [T.Resize(int(round(image_size / crop_pct)), interpolation=bicubic), T.CenterCrop(image_size)]
    else:
        finish = []
        augment = [RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=bicubic),
                   RandomHorizontalFlip()]
        if mode == "finetune" and rand_augment:
            # img_mean as an int: fill value for the single-channel image (timm's default is an RGB tuple).
            augment.append(RandAugment(rand_augment, {"translate_const": int(image_size * 0.45), "img_mean": 128}))
    finish += [T.ToTensor(), _ToChannels(in_chans), T.Normalize(mean, std)]
    return XrayTransform(augment, finish)
