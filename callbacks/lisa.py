"""LISA: layerwise importance sampling (Pan et al. 2024, arXiv 2403.17919), with bounded optimizer memory.

Every ``interval`` optimizer steps, ``n_layers`` of the L transformer blocks are drawn without replacement and
made trainable; the always-on parts (input embedding, output head, final norm, and any parameter outside the
blocks) train all the time (the paper's Algorithm 1, "E+H+gamma L").

The optimizer state of a block is dropped when the block is deactivated, so optimizer memory is bounded by the
trainable-now parameters and never grows with the number of switches; a block sampled again starts with fresh
moments (the per-interval restart the authors used). A block that is drawn again at the next interval, while
still active, keeps its moments.

``sampling="importance"`` draws block l with probability proportional to a score measured once at fit start on
the first training batches (model in eval mode, no grad; :mod:`callbacks.core.measured_weights`, the path
OwLore's outlier scores take too): the block influence
BI_l = 1 - mean_t cos(h_in, h_out) (ShortGPT, arXiv 2403.03853) or the relative contribution
||h_out - h_in|| / ||h_in|| (arXiv 2505.13898); blocks that change the residual stream more train more often.

The freezing, the release of optimizer state, the agreement across ranks, checkpointing and the requirements
(optimizer over all parameters, DDP, FSDP, gradient checkpointing) are the mechanism in
:mod:`callbacks.core.block_switching`; LISA is its policy: which blocks are drawn next.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from callbacks.core.block_switching import BlockSwitching, optimizer_state_bytes
from callbacks.core.blocks import ModelParts
from callbacks.core.layer_stats import METRICS
from callbacks.core.measured_weights import drawable, mean_block_metric, measure_on_first_batches

__all__ = ["LISA", "SAMPLINGS", "optimizer_state_bytes"]

SAMPLINGS = ("uniform", "importance")


class LISA(BlockSwitching):
    """Train ``n_layers`` randomly sampled blocks plus the always-on parts, re-sampled every ``interval`` steps.

    Args:
        n_layers: blocks trained at a time (the paper's gamma; 2 for 7B models, 4 for 70B).
        interval: optimizer steps between two draws (the paper's K; reference default 20).
        train_embedding: keep the input embedding trainable (freeze it for a large vocabulary: with Llama-3 8B the
            embedding and head are ~13% of the weights but most of LISA's trainable parameters).
        train_head: keep the output head trainable (a tied head follows the embedding).
        train_norm: keep the final norm trainable.
        weights: fixed per-block sampling weights (any non-negative numbers, normalised); ``None`` is uniform.
        sampling: ``"uniform"`` (or ``weights``), or ``"importance"``: weights measured at fit start, block l
            drawn with probability proportional to ``importance_metric`` (see
            :mod:`callbacks.core.layer_stats`) on ``importance_batches`` training batches.
        importance_metric: ``"block_influence"`` (1 - cos(h_in, h_out)) or ``"contribution"``
            (||h_out - h_in|| / ||h_in||).
        importance_batches: training batches the importance is averaged over.
        train_other: keep parameters outside the blocks that are none of the above trainable.
        seed: seed of the sampling generator (the same on every rank).
        blocks_path: dotted path to the blocks for models :func:`~callbacks.core.blocks.find_blocks` does not know.
    """

    log_prefix = "lisa"  # metrics: <log_prefix>/block_<i> = 1 while block i trains

    def __init__(
        self,
        n_layers: int = 2,
        interval: int = 20,
        train_embedding: bool = True,
        train_head: bool = True,
        train_norm: bool = True,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        blocks_path: str | None = None,
        sampling: str = "uniform",
        importance_metric: str = "block_influence",
        importance_batches: int = 1,
        train_other: bool = True,
    ) -> None:
        super().__init__(n_layers=n_layers, interval=interval, train_embedding=train_embedding,
                         train_head=train_head, train_norm=train_norm, train_other=train_other, seed=seed,
                         blocks_path=blocks_path)
        if weights is not None:
            weights = [float(w) for w in weights]
            if not all(math.isfinite(w) and w >= 0 for w in weights):
                raise ValueError(f"weights must be finite and non-negative, got {weights}")
            positive = sum(w > 0 for w in weights)
            if positive < n_layers:
                raise ValueError(f"weights has {positive} positive entries ({weights}) but n_layers={n_layers} blocks "
                                 "are drawn at a time without replacement, so a zero-weight block would be trained; "
                                 f"expected at least {n_layers} positive weights, or a smaller n_layers")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if sampling == "importance" and weights is not None:
            raise ValueError("sampling='importance' measures its own weights: leave weights unset")
        if importance_metric not in METRICS:
            raise ValueError(f"importance_metric must be one of {METRICS}, got {importance_metric!r}")
        if importance_batches < 1:
            raise ValueError(f"importance_batches must be at least 1, got {importance_batches}")
        self.weights = weights
        self.sampling = sampling
        self.importance_metric = importance_metric
        self.importance_batches = importance_batches
        self.importance: list[float] | None = None  # measured at fit start with sampling="importance"

    # ------------------------------------------------------------------------------------------- policy
    @override
    def check_parts(self, parts: ModelParts) -> None:
        super().check_parts(parts)
        if self.weights is not None and len(self.weights) != len(parts):
            raise ValueError(f"weights has {len(self.weights)} entries but the model has {len(parts)} blocks")

    @override
    def prepare_policy(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.sampling == "importance" and self.importance is None:  # a resumed run keeps its measured weights
            self.importance = self._measure_importance(trainer, pl_module)
            rank_zero_info(f"{type(self).__name__}: {self.importance_metric} per block (sampling weights): "
                           + ", ".join(f"{v:.4f}" for v in self.importance))

    def sampling_weights(self, num_blocks: int) -> torch.Tensor:
        """Per-block sampling weights (uniform unless ``weights`` was given)."""
        if self.importance is not None:
            return drawable(torch.tensor(self.importance, dtype=torch.float64), self.n_layers)
        if self.weights is None:
            return torch.ones(num_blocks, dtype=torch.float64)
        return torch.tensor(self.weights, dtype=torch.float64)

    def _measure_importance(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[float]:
        """Mean of ``importance_metric`` per block over the first ``importance_batches`` training batches."""
        return measure_on_first_batches(
            trainer, pl_module, self.importance_batches,
            lambda batches: mean_block_metric(pl_module, self.parts.blocks, batches, self.importance_metric,
                                              "LISA(sampling='importance')"),
            "LISA's importance measurement")

    @override
    def draw(self, num_blocks: int) -> list[int]:
        """Draw ``n_layers`` distinct blocks with probabilities proportional to :meth:`sampling_weights`."""
        chosen = torch.multinomial(self.sampling_weights(num_blocks), self.n_layers, replacement=False,
                                   generator=self.generator)
        return sorted(int(i) for i in chosen)

    # ---------------------------------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict:
        return {**super().state_dict(), "importance": self.importance}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.importance = state_dict.get("importance")

