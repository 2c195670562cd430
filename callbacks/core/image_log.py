"""Send one image to every logger that shows images: W&B and TensorBoard.

The callers also write the image as a PNG into the run folder (next to the CSV logger's ``metrics.csv``), so a run
without W&B or TensorBoard still keeps it; this helper is the one place that knows how each logger takes an image.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger


def log_image(loggers: Iterable[Logger], key: str, image: np.ndarray | torch.Tensor | str | Path,
              step: int | None = None, caption: str | None = None) -> None:
    """Log ``image`` under ``key`` to every W&B and TensorBoard logger in ``loggers``; other loggers are skipped.

    Args:
        loggers: usually ``trainer.loggers``.
        key: the image's name (``"layers/block_influence_heatmap"``).
        image: an RGB ``uint8`` array ``(H, W, C)``, a ``[0, 1]`` float tensor ``(C, H, W)``, or the path of an
            image file (W&B reads the file; TensorBoard, which needs pixels, is skipped).
        step: the global step to log at (``None``: the logger's own).
        caption: a caption shown under the image on W&B.
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            extra = {} if step is None else {"step": step}
            if caption is not None:
                extra["caption"] = [caption]
            pixels = to_uint8_hwc(image) if isinstance(image, torch.Tensor) else image
            logger.log_image(key=key, images=[str(pixels) if isinstance(pixels, Path) else pixels], **extra)
        elif isinstance(logger, TensorBoardLogger) and not isinstance(image, (str, Path)):
            if isinstance(image, torch.Tensor):
                logger.experiment.add_image(key, image, global_step=step)
            else:
                logger.experiment.add_image(key, image, step, dataformats="HWC")


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """A ``[0, 1]`` float ``(C, H, W)`` image as ``uint8`` ``(H, W, C)``: W&B reads float arrays as 0-255 values
    (a [0, 1] image arrives black), so the conversion is explicit."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
