"""OwLore: outlier-weighted layerwise sampling with low-rank gradients (Li et al. 2024, arXiv 2405.18380).

LISA (:class:`~callbacks.lisa.LISA`) with non-uniform block probabilities, measured on the same path as LISA's
importance sampling (:mod:`callbacks.core.measured_weights`): blocks with more weight outliers are
sampled more often. The score of block l is OWL's layerwise outlier distribution (arXiv 2310.05175):

    A_ij = |W_ij| * ||X_j||_2                       (Wanda score; ||X_j|| over the calibration tokens)
    D_l  = 100 * #{A > M * mean(A)} / #A           (pooled over all nn.Linear weights of block l)
    p_l  = D_l / sum_k D_k                          (OwLore code: no temperature)

and ``n_layers`` blocks are drawn without replacement with these weights (so a block's inclusion probability
is not ``n_layers * p_l``). The scores are computed at fit start from ``calibration_batches`` training batches
(padding tokens included), given as ``scores``, or cached in ``scores_file`` (the OwLore code reads a
precomputed file only, and from a wrong path).

The 2-D weights of the blocks are trained with GaLore low-rank gradients: the module's optimizer must be
:class:`~callbacks.core.galore.GaLoreAdamW`
(``optimizer: {class_path: callbacks.core.galore.GaLoreAdamW, init_args: {rank: 256, update_proj_gap: 100,
scale: 1.0}}``, OwLore's script values); embedding, head and norms get plain AdamW.
A deactivated block's state (moments and projector) is released, so a re-sampled block gets a fresh projector
and fresh moments. ``galore=False`` gives outlier-weighted LISA with any optimizer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from callbacks.core.block_panel import BlockPanel, log_block_scalars
from callbacks.core.galore import GaLoreAdamW
from callbacks.core.layer_stats import forward_batch
from callbacks.core.measured_weights import drawable, measure_on_first_batches, normalized
from callbacks.lisa import LISA


@torch.no_grad()
def outlier_scores(blocks: Sequence[nn.Module], batches: Iterable, forward: Callable[[object], object],
                   threshold: float = 5.0) -> list[float]:
    """OWL outlier ratio D_l (percent) of every block, from the inputs of its ``nn.Linear`` layers.

    ``forward(batch)`` runs the model on one batch; hooks on the blocks' linear layers accumulate the squared
    L2 norm of every input feature over all tokens.
    """
    named = [[(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)] for block in blocks]
    linears = [[m for _, m in block] for block in named]
    sq_norms: dict[nn.Linear, torch.Tensor] = {}

    def hook(module: nn.Linear, args: tuple) -> None:
        x = args[0].detach().reshape(-1, module.in_features).float()
        sq_norms[module] = sq_norms.get(module, 0) + x.pow(2).sum(0)

    handles = [lin.register_forward_pre_hook(hook) for block in linears for lin in block]
    try:
        for batch in batches:
            forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    scores = []
    for index, block in enumerate(linears):
        if not block:
            raise ValueError(f"Block {index} ({type(blocks[index]).__name__}) has no nn.Linear layer; OwLore's "
                             "outlier scores are computed from them")
        idle = [name for name, lin in named[index] if lin not in sq_norms]
        if idle:
            raise ValueError(f"Block {index}: the nn.Linear layer(s) {idle} did not run during calibration (the "
                             "forward pass did not reach them); every block's linear layers must run on a batch")
        metric = torch.cat([(lin.weight.detach().float().abs() * sq_norms[lin].sqrt()).flatten() for lin in block])
        scores.append(float((metric > threshold * metric.mean()).float().mean() * 100))
    return scores


def check_scores(scores: list[float], source: str) -> None:
    """``ValueError`` naming ``source`` unless every score is a finite, non-negative outlier ratio."""
    bad = [(i, s) for i, s in enumerate(scores) if not (math.isfinite(s) and s >= 0)]
    if bad:
        raise ValueError(f"{source}: outlier scores must be finite and non-negative (one D_l in percent per block); "
                         f"got {bad[:5]} as (block, score)")


class OwLore(LISA):
    """Outlier-weighted layerwise sampling with GaLore low-rank gradients for the sampled blocks.

    Args:
        n_layers: blocks trained at a time (OwLore's scripts: 5; at most the number of blocks).
        interval: optimizer steps between draws (OwLore's scripts: 50).
        train_embedding, train_head, train_norm: always-on parts, as in :class:`~callbacks.lisa.LISA`.
        outlier_threshold: M, an entry is an outlier when its score exceeds M times the mean (OWL paper: 5; OWL
            code default: 3).
        calibration_batches: training batches used to compute the scores (OWL: 128 sequences).
        scores: per-block outlier scores D_l given directly (skips calibration).
        scores_file: JSON cache ``{"scores": [...]}``: read when it exists, else written after calibration.
        galore: project the blocks' 2-D weight gradients (needs :class:`~callbacks.core.galore.GaLoreAdamW`).
        seed: seed of the sampling generator (the same on every rank).
        blocks_path: dotted path to the blocks for models the block finder does not know.
    """

    # its own dashboard area: owlore/block_<i>, owlore/score_<i>, owlore/prob_<i> (CSV); W&B panels:
    log_prefix = "owlore"
    panel_names = ("owlore/blocks", "owlore/scores", "owlore/probs")

    def __init__(
        self,
        n_layers: int = 5,
        interval: int = 50,
        train_embedding: bool = True,
        train_head: bool = True,
        train_norm: bool = True,
        outlier_threshold: float = 5.0,
        calibration_batches: int = 4,
        scores: Sequence[float] | None = None,
        scores_file: str | None = None,
        galore: bool = True,
        seed: int = 0,
        blocks_path: str | None = None,
    ) -> None:
        super().__init__(n_layers=n_layers, interval=interval, train_embedding=train_embedding,
                         train_head=train_head, train_norm=train_norm, weights=None, seed=seed,
                         blocks_path=blocks_path)
        if outlier_threshold <= 0:
            raise ValueError(f"outlier_threshold must be positive, got {outlier_threshold}")
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be at least 1, got {calibration_batches}")
        if scores is not None:
            check_scores([float(s) for s in scores], "scores")
            if sum(scores) <= 0:
                raise ValueError(f"scores must have a positive sum, got {list(scores)}")
        self.outlier_threshold = outlier_threshold
        self.calibration_batches = calibration_batches
        self.scores = [float(s) for s in scores] if scores is not None else None
        self.scores_file = scores_file
        self.galore = galore

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.scores is None and not (self.scores_file and Path(self.scores_file).exists()):
            self._check_blocks_have_linears()
        if self.galore:
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            if not isinstance(optimizer, GaLoreAdamW):
                raise TypeError(f"OwLore(galore=True) needs the GaLoreAdamW optimizer, got {type(optimizer).__name__}"
                                ": set model.optimizer.class_path to "
                                "callbacks.core.galore.GaLoreAdamW, or galore=False")
            optimizer.set_projected(p for block in self._block_params for p in block)

    def _check_blocks_have_linears(self) -> None:
        """Calibration scores the ``nn.Linear`` layers of every block: name a block that has none, and its layers."""
        for index, block in enumerate(self.parts.blocks):
            if not any(isinstance(m, nn.Linear) for m in block.modules()):
                layers = sorted({type(m).__name__ for m in block.modules()
                                 if any(p.ndim == 2 for p in m.parameters(recurse=False))})
                raise ValueError(f"OwLore computes outlier scores from the nn.Linear layers of each block, but block "
                                 f"{index} ({self.parts.blocks_path}.{index}, {type(block).__name__}) has none: its "
                                 f"weight layers are {layers}. Pass scores (or a scores_file) computed for this "
                                 "model, or use OwLore with a model whose blocks are built from nn.Linear")

    @override
    def prepare_policy(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.scores is None:
            self.scores = self._load_or_compute_scores(trainer, pl_module)
        if len(self.scores) != len(self._block_params):
            raise ValueError(f"OwLore has {len(self.scores)} scores but the model has {len(self._block_params)} "
                             "blocks (a stale scores_file?)")
        if trainer.global_step == 0:  # once per run: a resumed run already logged them
            self._log_scores(trainer)
        super().prepare_policy(trainer, pl_module)

    def _log_scores(self, trainer: L.Trainer) -> None:
        probs = self.probabilities()
        table = "\n".join(f"  block {i:3d}: D = {s:7.3f}%  p = {p:.4f}" for i, (s, p) in
                          enumerate(zip(self.scores, probs, strict=True)))
        rank_zero_info(f"OwLore outlier scores (M={self.outlier_threshold}):\n{table}")
        values = {"score": list(self.scores), "prob": [float(p) for p in probs]}
        log_block_scalars(trainer.loggers, values, lambda metric, i: f"owlore/{metric}_{i}", trainer.global_step)
        for metric, name in (("score", "owlore/scores"), ("prob", "owlore/probs")):  # W&B: one panel each
            panel = BlockPanel(name)
            panel.add(trainer.global_step, values[metric])
            panel.draw_to(trainer.loggers, trainer.global_step)

    def _load_or_compute_scores(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[float]:
        path = Path(self.scores_file) if self.scores_file else None
        if path is not None and path.exists():
            try:
                scores = [float(s) for s in json.loads(path.read_text())["scores"]]
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: expected JSON {{\"scores\": [numbers, one per block]}}: {err}") from err
            check_scores(scores, f"scores_file {path}")
            return scores
        scores = self._calibrate(trainer, pl_module)  # every rank samples with rank 0's scores
        if path is not None and trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"scores": scores, "outlier_threshold": self.outlier_threshold}))
        return scores

    def _calibrate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[float]:
        return measure_on_first_batches(
            trainer, pl_module, self.calibration_batches,
            lambda batches: outlier_scores(self.parts.blocks, batches, partial(forward_batch, pl_module),
                                           self.outlier_threshold), "OwLore's calibration")

    def probabilities(self) -> torch.Tensor:
        """p_l = D_l / sum_k D_k."""
        return normalized(self.scores, "OwLore: no block has outliers at this threshold; sampling uniformly")

    @override
    def sampling_weights(self, num_blocks: int) -> torch.Tensor:
        return drawable(self.probabilities(), self.n_layers)

    @override
    def state_dict(self) -> dict:
        return {**super().state_dict(), "scores": self.scores}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.scores = state_dict.get("scores")
