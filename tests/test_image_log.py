"""One helper sends an image to every logger that shows images (heatmaps, MAE reconstructions, the AUROC plot)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from callbacks.core.image_log import log_image, to_uint8_hwc


class FakeWandb(WandbLogger):
    def __init__(self):
        self.calls = []

    def log_image(self, key, images, **kwargs):
        self.calls.append((key, images, kwargs))


class FakeTensorBoard(TensorBoardLogger):
    def __init__(self):
        self.calls = []
        self._fake = SimpleNamespace(add_image=lambda *args, **kwargs: self.calls.append((args, kwargs)))

    @property
    def experiment(self):
        return self._fake


def test_each_logger_gets_the_image_in_its_own_format(tmp_path):
    wandb, board, csv = FakeWandb(), FakeTensorBoard(), CSVLogger(tmp_path)
    hwc = np.zeros((4, 5, 3), dtype=np.uint8)
    chw = torch.rand(3, 4, 5)
    log_image([csv, wandb, board], "a", hwc, step=7)
    log_image([csv, wandb, board], "b", chw, step=8, caption="rows")
    log_image([csv, wandb, board], "c", tmp_path / "plot.png")
    assert [(k, kw) for k, _, kw in wandb.calls] == [("a", {"step": 7}), ("b", {"step": 8, "caption": ["rows"]}),
                                                     ("c", {})]
    assert wandb.calls[0][1][0] is hwc
    assert np.array_equal(wandb.calls[1][1][0], to_uint8_hwc(chw)) and wandb.calls[1][1][0].dtype == np.uint8
    assert wandb.calls[2][1] == [str(tmp_path / "plot.png")]
    # TensorBoard: pixels only (a file path is skipped), HWC arrays declared as such, CHW tensors as they are
    assert [args[0] for args, _ in board.calls] == ["a", "b"]
    assert board.calls[0] == (("a", hwc, 7), {"dataformats": "HWC"})
    assert board.calls[1][0][1] is chw and board.calls[1][1] == {"global_step": 8}
