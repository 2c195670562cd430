"""LISA: layerwise importance sampling (Pan et al. 2024, arXiv 2403.17919), with bounded optimizer memory.

Every ``interval`` optimizer steps, ``n_layers`` of the L transformer blocks are drawn without replacement and
made trainable; the always-on parts (input embedding, output head, final norm, and any parameter outside the
blocks) train all the time (the paper's Algorithm 1, "E+H+gamma L").

The optimizer state of a block is dropped when the block is deactivated, so optimizer memory is bounded by the
trainable-now parameters and never grows with the number of switches; a block sampled again starts with fresh
moments (the per-interval restart the authors used). A block that is drawn again at the next interval, while
still active, keeps its moments.

``sampling="importance"`` draws block l with probability proportional to a score measured once at fit start on
the first training batches (model in eval mode, no grad), the way OwLore uses outlier scores: the block influence
BI_l = 1 - mean_t cos(h_in, h_out) (ShortGPT, arXiv 2403.03853) or the relative contribution
||h_out - h_in|| / ||h_in|| (arXiv 2505.13898); blocks that change the residual stream more train more often.

Requirements:
    * The optimizer must be built over all parameters (``CausalLMModule`` does this). The callback freezes only
      after the optimizer exists (``on_train_start``), so a block sampled later really trains.
    * DDP: parameters frozen mid-run produce no gradients, so use ``strategy: ddp_find_unused_parameters_true``.
      Every rank draws the same blocks (seeded CPU generator, saved in the checkpoint).
    * FSDP: use ``use_orig_params=True`` so ``requires_grad`` can differ inside a flattened unit.
    * Gradient checkpointing: with reentrant checkpointing and a frozen embedding, the input of the first block
      must require grad; the callback calls ``enable_input_require_grads()`` on a Hugging Face model for you.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from callbacks.core.blocks import ModelParts, find_blocks
from callbacks.core.layer_stats import (
    METRICS,
    first_training_batches,
    forward_batch,
    measuring,
    probe_blocks,
    token_mask,
)

SAMPLINGS = ("uniform", "importance")


class LISA(Callback):
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
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        if interval < 1:
            raise ValueError(f"interval must be a positive number of optimizer steps, got {interval}")
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
        self.n_layers = n_layers
        self.interval = interval
        self.train_embedding = train_embedding
        self.train_head = train_head
        self.train_norm = train_norm
        self.weights = weights
        self.sampling = sampling
        self.importance_metric = importance_metric
        self.importance_batches = importance_batches
        self.importance: list[float] | None = None  # measured at fit start with sampling="importance"
        self.train_other = train_other
        self.seed = seed
        self.blocks_path = blocks_path
        self.generator = torch.Generator().manual_seed(seed)
        self.active: list[int] = []
        self.sampled_at: int = -1  # optimizer step of the last draw
        self.parts: ModelParts | None = None
        self._block_params: list[list[nn.Parameter]] = []
        self._always_on: list[nn.Parameter] = []
        self._frozen_parts: list[nn.Parameter] = []

    # ------------------------------------------------------------------------------------------------ setup
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        parts = find_blocks(pl_module, self.blocks_path)
        if self.n_layers > len(parts):
            raise ValueError(f"n_layers={self.n_layers} but the model has only {len(parts)} blocks")
        if self.weights is not None and len(self.weights) != len(parts):
            raise ValueError(f"weights has {len(self.weights)} entries but the model has {len(parts)} blocks")
        named = dict(pl_module.named_parameters())
        # parameters frozen before we start (e.g. by the user) stay frozen
        self._block_params = [[p for p in block.parameters() if p.requires_grad] for block in parts.blocks]
        off = [part for part, on in (("embedding", self.train_embedding), ("head", self.train_head),
                                     ("final_norm", self.train_norm), ("other", self.train_other)) if not on]
        off_names = [n for part in off for n in parts.part_names(part)]
        outside = [named[n] for n in parts.embedding + parts.head + parts.final_norm + parts.other]
        self._frozen_parts = [named[n] for n in off_names if named[n].requires_grad]
        self._always_on = [p for p in outside if p.requires_grad and all(p is not q for q in self._frozen_parts)]
        for param in self._frozen_parts:
            param.requires_grad_(False)
        self.parts = parts
        if not self.train_embedding:
            _enable_input_require_grads(pl_module)
        self._freeze_for_summary(pl_module)

    def _freeze_for_summary(self, pl_module: L.LightningModule) -> None:
        """Until training starts, leave as many blocks trainable as train at a time (the restored active set, or
        the largest ``n_layers``), so the model summary printed at fit start counts the trainable-at-a-time
        parameters. The optimizer already holds every parameter; ``on_train_start`` sets the real active set."""
        sizes = [sum(p.numel() for p in params) for params in self._block_params]
        shown = self.active or sorted(range(len(sizes)), key=lambda i: -sizes[i])[: self.n_layers]
        for index, params in enumerate(self._block_params):
            for param in params:
                param.requires_grad_(index in shown)
        at_a_time = sum(p.numel() for p in self._always_on) + sum(sizes[i] for i in shown)
        total = sum(p.numel() for p in pl_module.parameters())
        rank_zero_info(f"{type(self).__name__}: {at_a_time:,} of {total:,} parameters train at a time "
                       f"({self.n_layers} of {len(sizes)} blocks plus the always-on parts)")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.sampling == "importance" and self.importance is None:  # a resumed run keeps its measured weights
            self.importance = self._measure_importance(trainer, pl_module)
            rank_zero_info(f"{type(self).__name__}: {self.importance_metric} per block (sampling weights): "
                           + ", ".join(f"{v:.4f}" for v in self.importance))
        # the optimizer exists (and a resumed state is loaded): freeze everything but the restored active set
        for index in range(len(self._block_params)):
            self._set_block(trainer, index, index in self.active)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # leave the model as we found it (e.g. for a later fit or for saving adapters)
        for param in self._frozen_parts + [p for block in self._block_params for p in block]:
            param.requires_grad_(True)

    # ------------------------------------------------------------------------------------------- sampling
    def sampling_weights(self, num_blocks: int) -> torch.Tensor:
        """Per-block sampling weights (uniform unless ``weights`` was given)."""
        if self.importance is not None:
            weights = torch.tensor(self.importance, dtype=torch.float64).nan_to_num(0.0).clamp_min(0.0)
            if int((weights > 0).sum()) < self.n_layers:  # drawing without replacement needs n_layers candidates
                weights = weights + 1e-6
            return weights
        if self.weights is None:
            return torch.ones(num_blocks, dtype=torch.float64)
        return torch.tensor(self.weights, dtype=torch.float64)

    def _measure_importance(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[float]:
        """Mean of ``importance_metric`` per block over the first ``importance_batches`` training batches."""
        totals, seen = torch.zeros(len(self.parts), dtype=torch.float64), 0
        with measuring(pl_module):
            for batch in first_training_batches(trainer, self.importance_batches):
                stats, _ = probe_blocks(self.parts.blocks, lambda b=batch: forward_batch(pl_module, b),
                                        token_mask(batch))
                totals += torch.tensor(stats[self.importance_metric], dtype=torch.float64)
                seen += 1
        if seen == 0:
            raise ValueError("LISA(sampling='importance') needs at least one training batch to measure on")
        values = (totals / seen).tolist()
        return trainer.strategy.broadcast(values, src=0)  # every rank samples with rank 0's measurement

    def draw(self, num_blocks: int) -> list[int]:
        """Draw ``n_layers`` distinct blocks with probabilities proportional to :meth:`sampling_weights`."""
        chosen = torch.multinomial(self.sampling_weights(num_blocks), self.n_layers, replacement=False,
                                   generator=self.generator)
        return sorted(int(i) for i in chosen)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.interval == 0 and step != self.sampled_at:
            self.switch(trainer, self.draw(len(self._block_params)))
            self.sampled_at = step
        pl_module.log_dict({f"{self.log_prefix}/block_{i}": float(i in self.active)
                            for i in range(len(self._block_params))}, on_step=True, on_epoch=False, batch_size=1)

    def switch(self, trainer: L.Trainer, new_active: list[int]) -> None:
        """Deactivate blocks leaving the active set (dropping their optimizer state), activate the new ones."""
        for index in self.active:
            if index not in new_active:
                self._set_block(trainer, index, False)
        for index in new_active:
            self._set_block(trainer, index, True)
        self.active = list(new_active)
        rank_zero_info(f"{type(self).__name__}: step {trainer.global_step}: training blocks {self.active}")

    def _set_block(self, trainer: L.Trainer, index: int, trainable: bool) -> None:
        for param in self._block_params[index]:
            param.requires_grad_(trainable)
            if not trainable:
                param.grad = None
                for optimizer in trainer.optimizers:
                    optimizer.state.pop(param, None)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters trained in the current interval: always-on parts and the active blocks."""
        return self._always_on + [p for i in self.active for p in self._block_params[i]]

    # ---------------------------------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "active": list(self.active), "sampled_at": self.sampled_at,
                "importance": self.importance}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.generator.set_state(state_dict["generator"])
        self.active = list(state_dict["active"])
        self.sampled_at = int(state_dict["sampled_at"])
        self.importance = state_dict.get("importance")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of ``optimizer.state`` (moments, steps, projectors)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def _enable_input_require_grads(pl_module: nn.Module) -> None:
    """With reentrant checkpointing and a frozen embedding, make the embedding output require grad."""
    for module in pl_module.modules():
        if not hasattr(module, "enable_input_require_grads"):
            continue
        checkpointing = getattr(module, "is_activation_checkpointing", None)  # transformers >= 5.x name
        if checkpointing is None:
            checkpointing = getattr(module, "is_gradient_checkpointing", False)
        if checkpointing:
            module.enable_input_require_grads()
            return
