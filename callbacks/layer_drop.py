"""Progressive layer dropping (Zhang & He, NeurIPS 2020, arXiv 2010.13369) for any Pre-LN transformer.

At optimizer step ``t`` the global keep ratio is (paper, eq. 5)

    theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar,

and block ``l`` of ``L`` (1-based) is kept with probability (paper, eq. 6)

    p_l = 1 - (l / L) * (1 - theta(t)),

so the lowest blocks are almost always kept and the top block is kept with probability theta(t). A dropped
block is not computed at all (no forward, no backward): that is where the time goes. A kept block's residual
branch is scaled by ``1 / p_l`` so the expected output matches the full model; for a Pre-LN block
``y = x + f(x)`` this is ``x + (y - x) / p_l``. Evaluation and prediction run every block, unscaled.
The same ``p_l`` is used for the draw and for the rescaling (the paper's eq. 6).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from callbacks.core.blocks import find_blocks
from callbacks.core.compiled_blocks import compiled_forward
from callbacks.core.unused_parameters import allow_unused_parameters


class ProgressiveLayerDrop(L.Callback):
    """Skip transformer blocks at random during training, more often deeper in the network and later in training.

    The callback replaces each block's ``forward`` by a wrapper (an instance attribute, removed again in
    ``teardown``), so parameter names and the ``state_dict`` are those of the plain model: a checkpoint trained
    with the callback loads into a model without it. A block compiled by
    :func:`~callbacks.core.compiled_blocks.compile_blocks` keeps its compiled forward inside the wrapper: the skip
    decision and the rescaling run outside the compiled code, so new drop patterns compile nothing.

    One Bernoulli draw per block is made at the start of every training batch (one draw for the whole
    micro-batch, as in the paper) from a seeded CPU ``torch.Generator``, identical on every rank, so all DDP ranks
    skip the same blocks. Skipped blocks leave their parameters without gradients, so the callback switches DDP's
    ``find_unused_parameters`` on in ``setup`` (plain ``strategy="ddp"`` works). Drawing once per batch (not per
    block call) also keeps gradient checkpointing consistent: the recomputation sees the same mask.

    Args:
        theta_bar: the keep ratio theta(t) decays to (paper: 0.5). ``1.0`` disables dropping.
        gamma: decay rate of theta(t) per optimizer step (paper: 0.001).
        warmup_steps: optimizer steps before dropping starts; the schedule's ``t`` counts from the end of the
            warm-up.
        keep_first: always run the first block.
        keep_last: always run the last block.
        seed: seed of the drop generator (the same on every rank).
        blocks_path: dotted path to the ``nn.ModuleList`` of blocks when :func:`~callbacks.core.blocks.find_blocks`
            cannot locate it.
    """

    def __init__(
        self,
        theta_bar: float = 0.5,
        gamma: float = 0.001,
        warmup_steps: int = 0,
        keep_first: bool = False,
        keep_last: bool = False,
        seed: int = 0,
        blocks_path: str | None = None,
    ) -> None:
        if not 0.0 < theta_bar <= 1.0:
            raise ValueError(f"theta_bar must be in (0, 1] (the keep ratio theta(t) decays to), got {theta_bar}")
        if gamma < 0.0:
            raise ValueError(f"gamma must be >= 0 (decay rate of theta(t) per optimizer step), got {gamma}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.theta_bar = theta_bar
        self.gamma = gamma
        self.warmup_steps = warmup_steps
        self.keep_first = keep_first
        self.keep_last = keep_last
        self.seed = seed
        self.blocks_path = blocks_path
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0  # optimizer step of the last draw
        self.blocks: nn.ModuleList | nn.Sequential | None = None
        self.keep: list[bool] | None = None  # this batch's draw; None runs every block unscaled
        self.probs: list[float] = []
        self._returns_tuple: tuple[int, ...] | None = None  # length of a block's tuple output; () means a tensor
        self._previous: list[Any] = []  # each block's instance-level forward before ours (compiled), or None

    # ------------------------------------------------------------------------------------------ schedule
    def theta(self, step: int) -> float:
        """Keep ratio theta(t) at optimizer ``step`` (paper, eq. 5); 1 during the warm-up."""
        if step < self.warmup_steps:
            return 1.0
        t = step - self.warmup_steps
        return (1.0 - self.theta_bar) * math.exp(-self.gamma * t) + self.theta_bar

    def keep_probabilities(self, step: int, num_blocks: int) -> list[float]:
        """Keep probability p_l = 1 - (l / L)(1 - theta(t)) of each block, l = 1..L (paper, eq. 6)."""
        theta = self.theta(step)
        probs = [1.0 - (depth / num_blocks) * (1.0 - theta) for depth in range(1, num_blocks + 1)]
        if self.keep_first:
            probs[0] = 1.0
        if self.keep_last:
            probs[-1] = 1.0
        return probs

    def sample(self, step: int, num_blocks: int) -> list[bool]:
        """Draw which blocks run at ``step`` (one Bernoulli draw per block) and remember it for the wrappers."""
        self.step = step
        self.probs = self.keep_probabilities(step, num_blocks)
        if all(p == 1.0 for p in self.probs):  # warm-up or theta_bar=1: no draw, the generator stays put
            self.keep = [True] * num_blocks
        else:
            u = torch.rand(num_blocks, generator=self.generator).tolist()
            self.keep = [ui < p for ui, p in zip(u, self.probs, strict=True)]
        return self.keep

    # ------------------------------------------------------------------------------------------- wrapping
    def install(self, model: nn.Module) -> None:
        """Wrap the forward of every block of ``model`` (a LightningModule, HF model or timm model)."""
        if self.blocks is not None:
            self.remove()
        parts = find_blocks(model, self.blocks_path)
        for index, block in enumerate(parts.blocks):
            if "forward" in block.__dict__ and compiled_forward(block) is None:
                raise RuntimeError(f"Block {index} of {parts.blocks_path} already has an instance-level forward "
                                   "(is another ProgressiveLayerDrop installed?)")
        self._previous = [block.__dict__.get("forward") for block in parts.blocks]
        for index, block in enumerate(parts.blocks):
            block.forward = self._make_forward(block, index, block.forward)  # the compiled or the class's
        self.blocks = parts.blocks

    def remove(self) -> None:
        """Give each block back the forward it had before: its compiled one, else the class's."""
        if self.blocks is not None:
            for block, previous in zip(self.blocks, self._previous, strict=True):
                block.__dict__.pop("forward", None)
                if previous is not None:
                    block.forward = previous
        self.blocks = None
        self.keep = None

    def _make_forward(self, block: nn.Module, index: int, original: Any):

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.keep is None or not block.training:
                return original(*args, **kwargs)
            x = _first_input(args, kwargs)
            p = self.probs[index]
            if not self.keep[index]:
                if self._returns_tuple is None:
                    with torch.no_grad():  # learn the output form once (tensor or tuple) at the cost of one forward
                        self._remember_form(original(*args, **kwargs))
                return x if not self._returns_tuple else (x,) + (None,) * (self._returns_tuple[0] - 1)
            out = original(*args, **kwargs)
            self._remember_form(out)
            if p == 1.0:
                return out
            # x + (out - x) / p as one fused kernel (lerp with weight 1/p): fewer launches per kept block
            if isinstance(out, tuple):
                return (torch.lerp(x, out[0], 1.0 / p),) + out[1:]
            return torch.lerp(x, out, 1.0 / p)

        return forward

    def _remember_form(self, out: Any) -> None:
        self._returns_tuple = (len(out),) if isinstance(out, tuple) else ()

    # -------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before the model is wrapped: skipped blocks have no gradient under DDP
            allow_unused_parameters(trainer, type(self).__name__)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install(pl_module)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        keep = self.sample(trainer.global_step, len(self.blocks))
        pl_module.log("pld/theta", self.theta(trainer.global_step), on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("pld/fraction_computed", sum(keep) / len(keep), on_step=True, on_epoch=False, batch_size=1)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.keep = None  # anything run outside a training batch (validation, generation) runs every block

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.remove()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A failed fit gets no ``teardown`` from Lightning: unwrap the blocks here, so the next fit (a retry, a
        sweep, a notebook cell) trains the plain model."""
        self.remove()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "generator": self.generator.get_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = state_dict["step"]
        self.generator.set_state(state_dict["generator"])


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block receives: its first positional argument, or ``hidden_states=``/``x=``."""
    if args:
        return args[0]
    for name in ("hidden_states", "x"):
        if name in kwargs:
            return kwargs[name]
    raise TypeError(f"ProgressiveLayerDrop cannot find a block's input among keyword arguments {sorted(kwargs)}; "
                    "expected the hidden states as the first positional argument, hidden_states= or x=")
