"""Measured sampling weights: one path for LISA's importance sampling and OwLore's outlier scores.

Both measure one number per block once, at fit start, on the first training batches (in the
:func:`~callbacks.core.layer_stats.measuring` context, so training is untouched), take rank 0's numbers on every
rank, and turn them into weights for drawing ``n_layers`` blocks without replacement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from callbacks.core.layer_stats import first_training_batches, forward_batch, measuring, probe_blocks, token_mask
from callbacks.run.preemption import stop_if_preempted


def measure_on_first_batches(trainer: L.Trainer, pl_module: L.LightningModule, batches: int,
                             measure: Callable[[Iterable], list[float]], phase: str) -> list[float]:
    """``measure(first training batches)`` in the measuring context; every rank gets rank 0's values. A
    preemption signal stops the measurement (``phase``, named in the message) before its next batch."""
    def checked() -> Iterator:
        for batch in first_training_batches(trainer, batches):
            stop_if_preempted(trainer, phase)
            yield batch

    with measuring(pl_module):
        values = measure(checked())
    stop_if_preempted(trainer, phase)  # a signal during the last batch
    return trainer.strategy.broadcast(values, src=0)  # every rank samples with rank 0's measurement


def mean_block_metric(pl_module: nn.Module, blocks: Sequence[nn.Module], batches: Iterable, metric: str,
                      source: str) -> list[float]:
    """Mean of the probe ``metric`` (see :func:`~callbacks.core.layer_stats.probe_blocks`) per block over
    ``batches``; ``ValueError`` naming ``source`` when there is no batch."""
    totals, seen = torch.zeros(len(blocks), dtype=torch.float64), 0
    for batch in batches:
        stats, _ = probe_blocks(blocks, lambda b=batch: forward_batch(pl_module, b), token_mask(batch))
        totals += torch.tensor(stats[metric], dtype=torch.float64)
        seen += 1
    if seen == 0:
        raise ValueError(f"{source} needs at least one training batch to measure on")
    return (totals / seen).tolist()


def normalized(values: Sequence[float], warning: str) -> torch.Tensor:
    """``values / sum(values)``; uniform, with ``warning``, when the sum is not positive."""
    weights = torch.tensor(values, dtype=torch.float64)
    if weights.sum() <= 0:
        rank_zero_warn(warning)
        return torch.full_like(weights, 1 / len(weights))
    return weights / weights.sum()


def drawable(weights: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Weights ``n_layers`` blocks can be drawn from without replacement: NaN (a block that did not run) and
    negative values count as 0, and when fewer than ``n_layers`` blocks are left with a positive weight every
    block gets 1e-6 more."""
    weights = weights.to(torch.float64).nan_to_num(0.0).clamp_min(0.0)
    if int((weights > 0).sum()) < n_layers:
        weights = weights + 1e-6
    return weights
