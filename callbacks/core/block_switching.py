"""Block switching: the mechanism LISA, OwLore and BAdam share; they differ only in which blocks train next.

The split follows Lightning's ``BaseFinetuning`` (mechanism: freeze and unfreeze; policy: ``finetune_function``).
:class:`BlockSwitching` trains ``n_layers`` of the model's blocks at a time plus the always-on parts (embedding,
head, final norm, the rest), switches the trained blocks every ``interval`` optimizer steps, releases the
optimizer state of a block it deactivates, keeps every rank on the same blocks and saves its state in
checkpoints. A subclass is the policy: :meth:`BlockSwitching.draw` says which blocks train next, and
:meth:`BlockSwitching.prepare_policy` measures what the policy needs once training is about to start.

The optimizer rule (one for all three techniques, see :meth:`BlockSwitching.freeze_inactive_blocks`): the
optimizer is built over every parameter (``CausalLMModule`` does this), and blocks are frozen only afterwards,
in ``on_train_start``, so a block drawn later really trains. A deactivated block's optimizer state is dropped,
so optimizer memory is bounded by the trainable-now parameters; a block drawn again starts with fresh moments,
one drawn again while still active keeps them.

Requirements:
    * DDP: parameters frozen mid-run produce no gradients, so the callback switches DDP's
      ``find_unused_parameters`` on in ``setup`` (:mod:`callbacks.core.unused_parameters`); plain
      ``strategy: ddp`` works. Every rank draws the same blocks (seeded CPU generator, saved in the checkpoint).
    * FSDP: ``use_orig_params=True`` (Lightning's default) so ``requires_grad`` can differ inside a flattened unit;
      ``False`` is refused before training.
    * Gradient checkpointing: with reentrant checkpointing and a frozen embedding, the input of the first block
      must require grad; the callback calls ``enable_input_require_grads()`` on a Hugging Face model for you.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from callbacks.core.block_panel import BlockPanel, log_block_scalars
from callbacks.core.blocks import ModelParts, find_blocks
from callbacks.core.unused_parameters import allow_unused_parameters


class BlockSwitching(Callback):
    """Train ``n_layers`` blocks chosen by :meth:`draw` plus the always-on parts, switching every ``interval`` steps.

    Args:
        n_layers: blocks trained at a time.
        interval: optimizer steps between two draws.
        train_embedding: keep the input embedding trainable all the time.
        train_head: keep the output head trainable all the time (a tied head follows the embedding).
        train_norm: keep the final norm trainable all the time.
        train_other: keep parameters outside the blocks that are none of the above trainable all the time.
        seed: seed of the generator a policy draws from (the same on every rank).
        blocks_path: dotted path to the blocks for models :func:`~callbacks.core.blocks.find_blocks` does not know.
    """

    log_prefix = "blocks"  # metrics: <log_prefix>/block_<i> = 1 while block i trains; W&B panel <log_prefix>/blocks

    def __init__(
        self,
        n_layers: int,
        interval: int,
        train_embedding: bool = True,
        train_head: bool = True,
        train_norm: bool = True,
        train_other: bool = True,
        seed: int = 0,
        blocks_path: str | None = None,
    ) -> None:
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        if interval < 1:
            raise ValueError(f"interval must be a positive number of optimizer steps, got {interval}")
        self.n_layers = n_layers
        self.interval = interval
        self.train_embedding = train_embedding
        self.train_head = train_head
        self.train_norm = train_norm
        self.train_other = train_other
        self.seed = seed
        self.blocks_path = blocks_path
        self.generator = torch.Generator().manual_seed(seed)
        self.active: list[int] = []
        self.sampled_at: int = -1  # optimizer step of the last draw
        self.panel = BlockPanel(f"{self.log_prefix}/blocks")  # the W&B view of which blocks trained when
        self.parts: ModelParts | None = None
        self._block_params: list[list[nn.Parameter]] = []
        self._always_on: list[nn.Parameter] = []
        self._frozen_parts: list[nn.Parameter] = []

    # ---------------------------------------------------------------------------------------------- policy
    def check_parts(self, parts: ModelParts) -> None:
        """Raise ``ValueError`` when the policy cannot work with the blocks found (called before anything freezes)."""
        if self.n_layers > len(parts):
            raise ValueError(f"n_layers={self.n_layers} but the model has only {len(parts)} blocks")

    def prepare_policy(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure what the policy needs (at ``on_train_start``, before the blocks freeze); nothing by default."""

    def draw(self, num_blocks: int) -> list[int]:
        """The blocks to train in the next interval (the policy)."""
        raise NotImplementedError(f"{type(self).__name__} must say which blocks train next: override draw()")

    # ----------------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before the model is wrapped: frozen blocks have no gradient under DDP
            allow_unused_parameters(trainer, type(self).__name__)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        parts = find_blocks(pl_module, self.blocks_path)
        self.check_parts(parts)
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
        self.prepare_policy(trainer, pl_module)
        self.freeze_inactive_blocks(trainer)

    def freeze_inactive_blocks(self, trainer: L.Trainer) -> None:
        """The optimizer rule: the optimizer was built over every parameter, and only now that it exists (and a
        resumed state is loaded) are the blocks outside the active set frozen, so a block drawn later is already
        in the optimizer and really trains when it is switched on."""
        for index in range(len(self._block_params)):
            self._set_block(trainer, index, index in self.active)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # leave the model as we found it (e.g. for a later fit or for saving adapters)
        for param in self._frozen_parts + [p for block in self._block_params for p in block]:
            param.requires_grad_(True)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A failed fit ends without ``on_fit_end``: unfreeze here too, so a retry trains the whole model."""
        self.on_fit_end(trainer, pl_module)

    # ------------------------------------------------------------------------------------------- switching
    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        switched = step % self.interval == 0 and step != self.sampled_at
        if switched:
            self.switch(trainer, self.draw(len(self._block_params)))
            self.sampled_at = step
        self._log_active(trainer, step, switched)

    def _log_active(self, trainer: L.Trainer, step: int, switched: bool) -> None:
        """Which blocks train: ``<log_prefix>/block_<i>`` (1 = training) to table loggers (CSV) at every logged
        step and switch, and one ``<log_prefix>/blocks`` heatmap panel (blocks x steps) to W&B at every switch."""
        values = [float(i in self.active) for i in range(len(self._block_params))]
        self.panel.add(step, values)
        if switched or step % max(trainer.log_every_n_steps, 1) == 0:
            log_block_scalars(trainer.loggers, {"block": values}, lambda _, i: f"{self.log_prefix}/block_{i}", step)
        if switched:
            self.panel.draw_to(trainer.loggers, step)

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

    # ---------------------------------------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "active": list(self.active), "sampled_at": self.sampled_at}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.generator.set_state(state_dict["generator"])
        self.active = list(state_dict["active"])
        self.sampled_at = int(state_dict["sampled_at"])


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
