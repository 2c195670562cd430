"""One per-block metric on the dashboard: a scalar per block for table-like loggers, one heatmap panel for W&B.

At 32 blocks a chart per block is 32 charts per metric (LISA's ``lisa/block_<i>``, the diagnostics'
``layers/<metric>/<i>``: hundreds of charts). Loggers that keep a table (CSV) still get one scalar per block, the
exact numbers; W&B gets one image panel per metric instead, a blocks x steps heatmap redrawn as the run goes (its
step slider shows each version).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from callbacks.core.heatmap import draw_heatmap
from callbacks.core.image_log import log_image


def panel_loggers(loggers: Iterable[Logger]) -> tuple[list[Logger], list[Logger]]:
    """``(loggers that get per-block scalars, W&B loggers that get one panel per metric)``."""
    loggers = list(loggers)
    return [lg for lg in loggers if not isinstance(lg, WandbLogger)], [lg for lg in loggers
                                                                      if isinstance(lg, WandbLogger)]


def log_block_scalars(loggers: Iterable[Logger], values: dict[str, Sequence[float]],
                      key: Callable[[str, int], str], step: int) -> None:
    """``values[metric][block]`` as one scalar ``key(metric, block)`` each (NaN left out), to every logger but W&B."""
    scalars = {key(metric, i): float(v) for metric, per_block in values.items() for i, v in enumerate(per_block)
               if not math.isnan(float(v))}
    if scalars:
        for logger in panel_loggers(loggers)[0]:
            logger.log_metrics(scalars, step=step)


class BlockPanel:
    """The history of one per-block metric, drawn as a heatmap panel for W&B.

    Args:
        name: the panel's key on W&B (``"lisa/blocks"``).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps: list[int] = []
        self.rows: list[list[float]] = []

    def add(self, step: int, values: Sequence[float]) -> None:
        """Record ``values`` (one per block) at ``step``; a repeated step replaces its row (gradient accumulation,
        a resumed run going over lost steps again)."""
        while self.steps and self.steps[-1] >= step:
            self.steps.pop()
            self.rows.pop()
        self.steps.append(step)
        self.rows.append([float(v) for v in values])

    def draw_to(self, loggers: Iterable[Logger], step: int) -> bool:
        """Send the heatmap so far to the W&B loggers among ``loggers`` (rank zero; nothing without one); returns
        whether it was sent."""
        wandb = panel_loggers(loggers)[1]
        if not wandb or not self.steps or rank_zero_only.rank != 0:
            return False
        log_image(wandb, self.name, draw_heatmap(self.rows, self.steps, self.name), step=step)
        return True
