"""Draw a blocks x time heatmap of one per-block metric, with marks for blocks that did not train or run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def draw_heatmap(values: Sequence[Sequence[float]], steps: Sequence[int], title: str, path: str | Path | None = None,
                 trained: Sequence[Sequence[float]] | None = None,
                 ran: Sequence[Sequence[float]] | None = None) -> np.ndarray:
    """Render ``values[t][block]`` (one row per measurement) as an RGB ``uint8`` image; optionally save a PNG.

    ``trained`` / ``ran`` (same shape, share of steps since the previous measurement in which the block had
    gradients / was computed) are drawn as marks when some block did not train or run: a dot whose size is the
    share of steps the block trained, a cross whose size is the share of steps it was skipped.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid = np.ma.masked_invalid(np.asarray(values, dtype=np.float64).T)  # blocks x time
    n_blocks, n_times = grid.shape
    fig, ax = plt.subplots(figsize=(min(5 + 0.1 * n_times, 14), min(3 + 0.2 * n_blocks, 10)), dpi=100,
                           layout="constrained")
    image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, fraction=0.04)
    ticks = np.linspace(0, n_times - 1, num=min(n_times, 8)).round().astype(int)
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_yticks(np.unique(np.linspace(0, n_blocks - 1, num=min(n_blocks, 16)).round().astype(int)))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("block")
    ax.set_title(title)
    _marks(ax, trained, "o", "trained (dot: share of steps)", invert=False)
    _marks(ax, ran, "x", "skipped (cross: share of steps)", invert=True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.15), fontsize="small", ncol=2, frameon=False)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    if path is not None:  # the pixels already drawn (savefig would render the figure a second time)
        from PIL import Image

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path)
    return rgb


def _marks(ax, shares: Sequence[Sequence[float]] | None, marker: str, label: str, invert: bool) -> None:
    if shares is None:
        return
    grid = np.asarray(shares, dtype=np.float64).T
    recorded = ~np.isnan(grid)
    if not recorded.any() or np.all(grid[recorded] >= 1.0):  # everything trained / ran: nothing to mark
        return
    size = np.nan_to_num((1.0 - grid) if invert else grid, nan=0.0)  # no record (e.g. step 0): no mark
    blocks, times = np.nonzero(size > 0)
    style = {"c": "white", "edgecolors": "black", "linewidths": 0.5} if marker == "o" else {"c": "red"}
    ax.scatter(times, blocks, s=40 * size[blocks, times], marker=marker, label=label, **style)
