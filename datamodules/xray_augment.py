"""Training augmentation that draws from a generator it is given, never from a process-wide one.

Each sample gets its own ``numpy.random.Generator`` (see :func:`sample_generator`), so the augmented image is a
function of (image, seed, epoch, index) alone: loading from threads or worker processes, in any order, gives the
same images, and no global random state (``random``, ``np.random``, ``torch``) is read or changed.

- :class:`RandomResizedCrop` / :class:`RandomHorizontalFlip`: torchvision's ops with their parameters drawn from
  the generator (same parameter distributions as torchvision).
- :class:`RandAugment`: timm's RandAugment (a policy string such as ``rand-m6-mstd0.5-inc1`` is parsed by timm
  and timm's image operations are applied) with every random choice drawn from the generator: which operations,
  whether each applies, its magnitude, its sign and its interpolation. The distributions are timm's; the stream
  of random numbers is not, so images differ from timm's own RandAugment for the same global seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F


def sample_generator(*entropy: int) -> np.random.Generator:
    """A generator seeded by ``entropy`` alone, e.g. ``(seed, epoch, index)`` (distinct tuples, independent
    streams: NumPy's ``SeedSequence`` mixes them)."""
    return np.random.default_rng([int(e) for e in entropy])


class RandomResizedCrop:
    """torchvision's ``RandomResizedCrop`` (area ``scale``, log-uniform aspect ``ratio``, 10 tries, then a center
    crop of the clamped ratio) with its box drawn from ``rng``."""

    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> None:
        if not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"scale and ratio need 0 < low <= high, got scale={scale}, ratio={ratio}")
        self.size, self.scale, self.ratio, self.interpolation = size, tuple(scale), tuple(ratio), interpolation

    def box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of the crop."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        top, left, h, w = self.box(*img.size, rng)
        return F.resized_crop(img, top, left, h, w, [self.size, self.size], self.interpolation)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``, drawn from ``rng``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        return F.hflip(img) if rng.random() < self.p else img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


# Operations whose level timm negates with probability 1/2, and how it computes their positive argument.
_SIGNED = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3}
_ENHANCE_INCREASING = ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")


class RandAugment:
    """timm's RandAugment for ``policy`` (e.g. ``rand-m6-mstd0.5-inc1``) with its random choices drawn from ``rng``.

    The policy string and ``hparams`` are parsed by ``timm.data.auto_augment.rand_augment_transform``; per image,
    ``num_layers`` operations are chosen (uniformly with replacement, or by the policy's weights without), each
    applies with its probability, with magnitude ``N(m, mstd)`` clipped to ``[0, mmax or 10]``, a random sign where
    timm draws one, and a random bilinear/bicubic resampling for geometric operations, as timm does.
    """

    def __init__(self, policy: str, hparams: dict | None = None) -> None:
        from timm.data.auto_augment import rand_augment_transform

        timm_ra = rand_augment_transform(policy, dict(hparams or {}))
        unsupported = sorted({op.name for op in timm_ra.ops if op.name == "GaussianBlurRand"})
        if unsupported:
            raise ValueError(f"RandAugment policy {policy!r} uses {unsupported}, which draws from the global random "
                             "state; choose another operation set")
        self.policy, self.ops, self.num_layers = policy, timm_ra.ops, timm_ra.num_layers
        self.choice_weights = timm_ra.choice_weights

    def _level_args(self, op, magnitude: float, rng: np.random.Generator) -> tuple:
        """timm's level-to-argument of ``op`` at ``magnitude``, its random sign drawn from ``rng``."""
        level = magnitude / 10.0
        sign = -1.0 if rng.random() > 0.5 else 1.0  # drawn for every operation, so the stream does not branch
        if op.name in _SIGNED:
            return (sign * level * _SIGNED[op.name],)
        if op.name in ("TranslateX", "TranslateY"):
            return (sign * level * float(op.hparams["translate_const"]),)
        if op.name in ("TranslateXRel", "TranslateYRel"):
            return (sign * level * op.hparams.get("translate_pct", 0.45),)
        if op.name in _ENHANCE_INCREASING:
            return (max(0.1, 1.0 + sign * level * 0.9),)
        if op.name.startswith("Posterize"):  # timm reaches 0 bits at magnitude 10, which Pillow refuses
            return (max(1, op.level_fn(magnitude, op.hparams)[0]),)
        return op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()

    def _apply(self, op, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if op.prob < 1.0 and rng.random() > op.prob:
            return img
        magnitude = op.magnitude
        if op.magnitude_std == float("inf"):
            magnitude = rng.uniform(0, magnitude)
        elif op.magnitude_std > 0:
            magnitude = rng.normal(magnitude, op.magnitude_std)
        magnitude = max(0.0, min(magnitude, op.magnitude_max or 10.0))
        args = self._level_args(op, magnitude, rng)
        kwargs = dict(op.kwargs)
        resample = kwargs["resample"]
        if isinstance(resample, (list, tuple)):
            kwargs["resample"] = resample[int(rng.integers(len(resample)))]
        return op.aug_fn(img, *args, **kwargs)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        chosen = rng.choice(len(self.ops), self.num_layers, replace=self.choice_weights is None,
                            p=self.choice_weights)
        for k in chosen:
            img = self._apply(self.ops[int(k)], img, rng)
        return img

    def __repr__(self) -> str:
        return f"RandAugment({self.policy!r}, n={self.num_layers}, ops={[op.name for op in self.ops]})"
