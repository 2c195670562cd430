"""Per-label and macro AUROC where a label without positives (or negatives) is undefined, not 0.

torchmetrics' ``MultilabelAUROC`` returns 0 for such a label and averages it in; sklearn raises. Here it is
reported as ``None`` (undefined) and left out of the macro mean. Entries with target ``-1`` (CheXpert
"ignore" uncertainty policy) are left out of both the AUROC and the counts.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import torch
from torchmetrics import Metric
from torchmetrics.classification import MultilabelAUROC

IGNORE = -1


class LabelCounts(Metric):
    """Positives and negatives per label (synced across ranks), ignoring target ``-1``."""

    full_state_update = False

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.add_state("positives", torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("negatives", torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, target: torch.Tensor) -> None:
        self.positives += (target == 1).sum(0)
        self.negatives += (target == 0).sum(0)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.positives, self.negatives


class MaskedMultilabelAUROC(torch.nn.Module):
    """``update(logits, target)`` then ``compute()`` -> ``(macro, per_label, positives, negatives)``.

    ``per_label`` is a list with ``None`` for undefined labels; ``macro`` is the mean over the defined ones
    (``None`` when no label is defined).
    """

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.auroc = MultilabelAUROC(num_labels=num_labels, average=None, ignore_index=IGNORE)
        self.counts = LabelCounts(num_labels)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        target = target.long()
        self.auroc.update(logits.float(), target)
        self.counts.update(target)

    def compute(self) -> tuple[float | None, list[float | None], list[int], list[int]]:
        positives, negatives = (t.tolist() for t in self.counts.compute())
        with warnings.catch_warnings():  # torchmetrics warns for labels without positives: reported as undefined
            warnings.filterwarnings("ignore", message=".*(positive|negative) samples.*")
            values = self.auroc.compute().tolist()
        per_label = [v if p > 0 and n > 0 else None for v, p, n in zip(values, positives, negatives, strict=True)]
        defined = [v for v in per_label if v is not None]
        macro = sum(defined) / len(defined) if defined else None
        return macro, per_label, positives, negatives

    def reset(self) -> None:
        self.auroc.reset()
        self.counts.reset()


def write_auroc_table(path: str | Path, label_names: list[str], per_label: list[float | None], positives: list[int],
                      negatives: list[int], macro: float | None) -> tuple[Path, Path]:
    """Write ``<path>.csv`` (label, auroc or ``undefined``, positives, negatives, then ``macro``) and a bar plot PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = path.with_suffix(".csv"), path.with_suffix(".png")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "auroc", "positives", "negatives"])
        for name, value, p, n in zip(label_names, per_label, positives, negatives, strict=True):
            writer.writerow([name, "undefined" if value is None else f"{value:.4f}", p, n])
        writer.writerow(["macro", "undefined" if macro is None else f"{macro:.4f}", sum(positives), sum(negatives)])

    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(label_names) + 1.5), 3.5))
    heights = [v if v is not None else 0.0 for v in per_label]
    colors = ["tab:blue" if v is not None else "lightgray" for v in per_label]
    ax.bar(range(len(label_names)), heights, color=colors)
    for i, v in enumerate(per_label):
        if v is None:
            ax.text(i, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=0.8)
    if macro is not None:
        ax.axhline(macro, color="tab:red", linewidth=1.0, label=f"macro {macro:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(range(len(label_names)), label_names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUROC")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path


def log_auroc_table(loggers: list, csv_path: Path, png_path: Path) -> None:
    """Send the written table (``test/auroc_table``) and its bar plot (``test/auroc_plot``) to every W&B logger."""
    from lightning.pytorch.loggers import WandbLogger

    from callbacks.core.image_log import log_image

    with Path(csv_path).open() as f:
        header, *rows = list(csv.reader(f))
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key="test/auroc_table", columns=header, data=rows)
    log_image(loggers, "test/auroc_plot", Path(png_path))
