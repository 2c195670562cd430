"""Log MAE reconstructions (original / masked / reconstruction rows, each labelled on the left) to the loggers and as
PNG files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image
from typing_extensions import override

from callbacks.core.image_log import log_image

ROW_LABELS = ("original", "masked", "reconstruction")


def label_rows(grid: torch.Tensor, labels: tuple[str, ...]) -> torch.Tensor:
    """``grid`` (``(C, H, W)`` in ``[0, 1]``, ``len(labels)`` equal rows) with a white strip on the left naming
    each row, so a grid on the dashboard reads without its caption."""
    from PIL import Image, ImageDraw

    width = 8 + 7 * max(map(len, labels))
    strip = Image.new("L", (width, grid.shape[1]), 255)
    draw = ImageDraw.Draw(strip)
    row_height = grid.shape[1] / len(labels)
    for i, text in enumerate(labels):
        draw.text((4, int((i + 0.5) * row_height) - 5), text, fill=0)
    pixels = torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255.0)
    return torch.cat([pixels.expand(grid.shape[0], -1, -1).to(grid.dtype), grid], dim=2)


class MAEReconstructionLogger(Callback):
    """After a validation run, at most once every ``every_n_epochs``, reconstruct the first validation images and
    save a grid.

    The mask is drawn from a fixed seed (inside ``torch.random.fork_rng``), so grids of different epochs show the
    same masked patches and the training RNG stream is untouched. Works with any module that has
    ``reconstruct(images) -> (mask, reconstruction)`` (``MAEPretrainModule``).

    Args:
        every_n_epochs: the least number of epochs between two grids. The first validation run logs one, then the
            first validation run at least ``every_n_epochs`` after the last grid (so it works with any
            ``check_val_every_n_epoch`` or ``val_check_interval``).
        num_images: images per grid (columns).
        dirpath: PNG folder; default ``<run dir>/mae_reconstructions``.
        seed: seed of the displayed masks.
    """

    def __init__(self, every_n_epochs: int = 10, num_images: int = 8, dirpath: str | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError(f"every_n_epochs and num_images must be positive, got {every_n_epochs}, {num_images}")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.dirpath = dirpath
        self.seed = seed
        self._images: torch.Tensor | None = None
        self.saved: list[Path] = []
        self._last_epoch: int | None = None

    def due(self, epoch: int) -> bool:
        """Whether a validation run in ``epoch`` logs a grid."""
        return self._last_epoch is None or epoch - self._last_epoch >= self.every_n_epochs

    @override
    def state_dict(self) -> dict:
        return {"last_epoch": self._last_epoch}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self._last_epoch = state_dict.get("last_epoch")

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._images is None or self._images.shape[0] < self.num_images:
            images = batch["image"][: self.num_images].detach().cpu()
            self._images = images if self._images is None else torch.cat([self._images, images])[: self.num_images]

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._images is None or not self.due(trainer.current_epoch):
            return
        self._last_epoch = trainer.current_epoch
        if not hasattr(pl_module, "reconstruct"):
            raise TypeError(f"MAEReconstructionLogger needs a module with reconstruct(images); got "
                            f"{type(pl_module).__name__}")
        with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            mask, recon = pl_module.reconstruct(self._images.to(pl_module.device))
        grid = self.make_grid(self._images, mask.cpu(), recon.cpu())
        log_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        self._log(trainer, grid, log_dir)

    def make_grid(self, original: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Rows original / masked (removed patches gray) / reconstruction, scaled by each original's own range."""
        low = original.amin(dim=(1, 2, 3), keepdim=True)
        high = original.amax(dim=(1, 2, 3), keepdim=True)

        def scale(x: torch.Tensor) -> torch.Tensor:
            return ((x - low) / (high - low).clamp(min=1e-6)).clamp(0, 1)

        masked_view = torch.where(mask.bool(), torch.full_like(original, 0.5), scale(original))
        rows = torch.cat([scale(original), masked_view, scale(recon)])
        grid = make_grid(rows, nrow=original.shape[0], padding=2, pad_value=1.0)
        return label_rows(grid, ROW_LABELS)

    @rank_zero_only
    def _log(self, trainer: L.Trainer, grid: torch.Tensor, log_dir: str | None) -> None:
        folder = Path(self.dirpath) if self.dirpath else Path(log_dir or trainer.default_root_dir) / \
            "mae_reconstructions"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch_{trainer.current_epoch:04d}.png"
        save_image(grid, path)
        self.saved.append(path)
        log_image(trainer.loggers, "mae/reconstruction", grid, step=trainer.global_step,
                  caption="rows: " + " / ".join(ROW_LABELS))

