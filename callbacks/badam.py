"""BAdam: block-coordinate Adam (Luo et al. 2024, arXiv 2404.02827), as a LISA variant that trains one block.

The model's D transformer blocks are visited one at a time. Block pi_j (in the order of the current pass) trains
with Adam for K optimizer steps while every other parameter is frozen (the paper's Algorithm 1):

    for pass t = 1, 2, ...:   pi = order of the D blocks (ascending, descending, a random permutation, or a list)
        for j = 1..D:         theta_{pi_j} <- K Adam steps on theta_{pi_j}, starting from zero moments

Adam state exists only for the active block: it is released at every switch (fresh moments per visit, as in the
paper), so optimizer memory is 8 bytes x (parameters of one block) in fp32 AdamW. The embedding, head, final
norm and any other parameter outside the blocks stay frozen unless switched on (``train_embedding``, ...), in
which case they train all the time. The paper suggests K = max(n / (B * D), 50) for n samples and batch size B.

Built on :class:`~callbacks.core.block_switching.BlockSwitching`, the mechanism LISA and OwLore use too
(freezing, state release, checkpointing and the DDP/FSDP/checkpointing requirements); BAdam is only its policy,
the order of the blocks. The random order is drawn from the seeded generator, so every rank visits the same
blocks.
"""

from __future__ import annotations

import lightning as L
import torch
from typing_extensions import override

from callbacks.core.block_switching import BlockSwitching
from callbacks.core.blocks import ModelParts

ORDERS = ("ascending", "descending", "random")


class BAdam(BlockSwitching):
    """Train one block at a time, switching every ``interval`` optimizer steps in a fixed or random order.

    Args:
        interval: optimizer steps per block (the paper's K; reference code default 50).
        order: ``"descending"`` (last block first, the reference code's default), ``"ascending"``, ``"random"`` (a
            fresh permutation of all blocks per pass), or a list of block indices visited in turn (one pass).
        train_embedding: keep the input embedding trainable all the time (off in BAdam).
        train_head: keep the output head trainable all the time.
        train_norm: keep the final norm trainable all the time.
        train_other: keep the remaining parameters outside the blocks trainable all the time.
        seed: seed of the generator behind ``order="random"`` (the same on every rank).
        blocks_path: dotted path to the blocks for models the block finder does not know.
    """

    log_prefix = "badam"

    def __init__(
        self,
        interval: int = 50,
        order: str | list[int] = "descending",
        train_embedding: bool = False,
        train_head: bool = False,
        train_norm: bool = False,
        train_other: bool = False,
        seed: int = 0,
        blocks_path: str | None = None,
    ) -> None:
        super().__init__(n_layers=1, interval=interval, train_embedding=train_embedding, train_head=train_head,
                         train_norm=train_norm, train_other=train_other, seed=seed, blocks_path=blocks_path)
        if isinstance(order, str):
            if order not in ORDERS:
                raise ValueError(f"order must be one of {ORDERS} or a list of block indices, got {order!r}")
        else:
            order = list(order)
            if not order or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in order):
                raise ValueError(f"order as a list must hold block indices (integers >= 0), got {order}")
        self.order = order
        self.pass_order: list[int] = []  # blocks of the current pass
        self.position = 0  # blocks of the current pass already visited

    @override
    def check_parts(self, parts: ModelParts) -> None:
        super().check_parts(parts)
        if isinstance(self.order, list) and max(self.order) >= len(parts):
            raise ValueError(f"order lists block {max(self.order)} but the model has only {len(parts)} blocks "
                             f"(0..{len(parts) - 1})")

    def next_pass(self, num_blocks: int) -> list[int]:
        """The block order of one pass."""
        if self.order == "ascending":
            return list(range(num_blocks))
        if self.order == "descending":
            return list(reversed(range(num_blocks)))
        if self.order == "random":
            return torch.randperm(num_blocks, generator=self.generator).tolist()
        return list(self.order)

    @override
    def draw(self, num_blocks: int) -> list[int]:
        if self.position >= len(self.pass_order):
            self.pass_order, self.position = self.next_pass(num_blocks), 0
        block = self.pass_order[self.position]
        self.position += 1
        return [block]

    @override
    def switch(self, trainer: L.Trainer, new_active: list[int]) -> None:
        """A block drawn again right after its own visit (across a pass boundary of the random order, or twice in
        a listed order) starts a new visit: its moments are released too, as for every other visit."""
        for index in set(self.active) & set(new_active):
            self._set_block(trainer, index, False)
        super().switch(trainer, new_active)

    @override
    def state_dict(self) -> dict:
        return {**super().state_dict(), "pass_order": list(self.pass_order), "position": self.position}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.pass_order = list(state_dict["pass_order"])
        self.position = int(state_dict["position"])
