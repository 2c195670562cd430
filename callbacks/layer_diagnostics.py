"""Per-block diagnostics during training: how much each block changes the residual stream, and how it learns.

Every ``interval`` optimizer steps, on a fixed probe batch (the first training batch, captured once, so values
are comparable over time), for every block l with input h_in and output h_out:

    block_influence   BI_l = 1 - mean_t cos(h_in[t], h_out[t])             (ShortGPT, arXiv 2403.03853, eq. 1)
    contribution      C_l  = mean_t ||h_out[t] - h_in[t]|| / ||h_in[t]||   (Csordas et al., arXiv 2505.13898)
    grad_norm         ||g_l||_2 over the block's parameters at that optimizer step (after unscaling)
    update_ratio      ||W_l - W_l'||_2 / ||W_l||_2, W_l' the block's weights at the previous measurement
    logit_lens_kl     mean_t KL(p_final[t] || softmax(head(norm(h_out[t]))))   (causal LMs, ``logit_lens=True``)
    trained, ran      share of the optimizer steps / training batches since the previous measurement in which the
                      block had gradients / was computed (LISA, OwLore, BAdam freeze blocks; layer drop skips them)

Values are logged as ``layers/<metric>/<block>`` at the optimizer step they describe to table loggers (CSV).
During training (after a measurement, at most every ``heatmap_seconds``), at the end of training and when training
stops on an exception (a preemption included) one blocks x time heatmap per metric is drawn into
``<run dir>/layer_diagnostics/<metric>.png`` and sent to W&B (``layers/<metric>_heatmap``: one panel per metric
instead of a chart per block) and TensorBoard when those loggers are used; blocks that did not train or run are
marked on it.

The probe forward runs in eval mode (no dropout, layer drop runs every block), under ``torch.no_grad`` and a
forked random state, so the callback does not change training. Under DDP the probe batch is rank 0's, so every
rank measures the same values. The update ratio keeps a copy of the block weights (on ``snapshot_device``) that is
saved in checkpoints, so a resumed run logs the same values; ``update_ratio=False`` drops both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from typing_extensions import override

from callbacks.core.block_panel import log_block_scalars
from callbacks.core.blocks import find_blocks
from callbacks.core.heatmap import draw_heatmap
from callbacks.core.image_log import log_image
from callbacks.core.layer_stats import (
    forward_batch,
    grad_norms,
    logit_lens_kl,
    measuring,
    parameter_groups,
    probe_blocks,
    token_mask,
)


class LayerDiagnostics(Callback):
    """Measure per-block influence, contribution, gradient norm and update ratio every ``interval`` steps.

    Args:
        interval: optimizer steps between measurements (also measured once before the first step).
        probe_size: rows of the first training batch kept as the probe batch (``None``: the whole batch).
        update_ratio: measure ||dW|| / ||W|| (keeps a copy of the block weights).
        logit_lens: measure the logit-lens KL of every block (causal LMs with a final norm and output head).
        heatmaps: draw the heatmaps during training (after a measurement, at most every ``heatmap_seconds``), at
            the end of training and on an exception.
        heatmap_seconds: least wall-clock time between two drawings during training (0: after every
            measurement).
        snapshot_device: where the weight copy for the update ratio lives (``"cpu"`` spares accelerator memory;
            ``None``: next to the weights).
        blocks_path: dotted path to the blocks for models :func:`~callbacks.core.blocks.find_blocks` does not know.
    """

    def __init__(self, interval: int = 100, probe_size: int | None = 8, update_ratio: bool = True,
                 logit_lens: bool = False, heatmaps: bool = True, snapshot_device: str | None = None,
                 blocks_path: str | None = None, heatmap_seconds: float = 60.0) -> None:
        if interval < 1:
            raise ValueError(f"interval must be a positive number of optimizer steps, got {interval}")
        if not heatmap_seconds >= 0:
            raise ValueError(f"heatmap_seconds must be >= 0, got {heatmap_seconds}")
        self.heatmap_seconds = heatmap_seconds
        if probe_size is not None and probe_size < 1:
            raise ValueError(f"probe_size must be at least 1 (or null for the whole batch), got {probe_size}")
        self.interval = interval
        self.probe_size = probe_size
        self.update_ratio = update_ratio
        self.logit_lens = logit_lens
        self.heatmaps = heatmaps
        self._folder: Path | None = None  # where the heatmaps go (found at the first measurement)
        self._drawn_at: float | None = None  # time.monotonic() of the last drawing (or of the first measurement)
        self.snapshot_device = snapshot_device
        self.blocks_path = blocks_path
        self.probe = None  # the probe batch, on the CPU
        self.steps: list[int] = []
        self.history: dict[str, list[list[float]]] = {}
        self.snapshot: list[list[torch.Tensor]] | None = None
        self._blocks: nn.ModuleList | None = None
        self._groups: list[list[nn.Parameter]] = []
        self._lens = None
        self._handles: list = []
        self._ran_now: list[bool] = []
        self._ran = self._trained = None  # counts since the last measurement
        self._batches = self._opt_steps = 0
        self._grad_norm: list[float] | None = None
        self._due = False

    # ------------------------------------------------------------------------------------------------ setup
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        parts = find_blocks(pl_module, self.blocks_path)
        self._blocks = parts.blocks
        self._groups = parameter_groups(parts.blocks)
        n = len(parts.blocks)
        self._ran_now = [False] * n
        if self._ran is None:  # else restored from a checkpoint
            self._ran, self._trained = [0] * n, [0] * n
        if self.logit_lens:
            self._lens = _logit_lens(pl_module, parts)
        for index, block in enumerate(parts.blocks):
            children = list(block.children()) or [block]  # a skipped block runs none of its children
            for child in children:
                self._handles.append(child.register_forward_hook(self._ran_hook(index)))

    def _ran_hook(self, index: int):
        def hook(module, args, output):
            self._ran_now[index] = True
        return hook

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.update_ratio:
            return
        if self.snapshot is None:
            self._take_snapshot()
        else:  # restored from a checkpoint
            self.snapshot = [[w.to(self._snapshot_device(p)) for w, p in zip(ws, ps, strict=True)]
                             for ws, ps in zip(self.snapshot, self._groups, strict=True)]

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -------------------------------------------------------------------------------------------- training
    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.probe is None:
            rows = slice(None, self.probe_size)
            probe = apply_to_collection(batch, torch.Tensor, lambda t: t[rows].detach().cpu().clone())
            self.probe = trainer.strategy.broadcast(probe, src=0)
        if trainer.global_step == 0 and not self.steps:
            self._measure(trainer, pl_module, grad=None, update=None)
        self._ran_now = [False] * len(self._ran_now)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self._opt_steps += 1
        for index, params in enumerate(self._groups):
            self._trained[index] += any(p.grad is not None for p in params)
        if (trainer.global_step + 1) % self.interval == 0:
            self._grad_norm, self._due = grad_norms(self._groups), True

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._batches += 1
        for index, ran in enumerate(self._ran_now):
            self._ran[index] += ran
        if not self._due:
            return
        self._due = False
        update = self._update_ratios() if self.update_ratio else None
        self._measure(trainer, pl_module, grad=self._grad_norm, update=update)
        if self.update_ratio:
            self._take_snapshot()

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.heatmaps and self.steps:
            folder = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir is a collective call under DDP
            self.draw(trainer, folder / "layer_diagnostics")

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A failed or interrupted fit: draw the heatmaps measured so far, then remove the hooks (Lightning calls no
        ``teardown`` after an exception), so none stays on the model."""
        if self.heatmaps and self.steps and self._folder is not None:  # the folder of the last measurement
            self.draw(trainer, self._folder)
        self.teardown(trainer, pl_module, "fit")

    # ----------------------------------------------------------------------------------------- measurement
    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule, grad: list[float] | None,
                 update: list[float] | None) -> None:
        values = self.probe_metrics(trainer, pl_module)
        nan = [math.nan] * len(self._groups)
        values["grad_norm"] = grad if grad is not None else nan
        if self.update_ratio:
            values["update_ratio"] = update if update is not None else nan
        if self.steps:  # shares since the previous measurement
            values["trained"] = [t / max(self._opt_steps, 1) for t in self._trained]
            values["ran"] = [r / max(self._batches, 1) for r in self._ran]
        else:
            values["trained"], values["ran"] = nan, nan
        self._trained, self._ran = [0] * len(self._groups), [0] * len(self._groups)
        self._opt_steps = self._batches = 0
        step = trainer.global_step
        self.steps.append(step)
        for metric, per_block in values.items():
            self.history.setdefault(metric, []).append([float(v) for v in per_block])
        log_block_scalars(trainer.loggers, values, lambda metric, i: f"layers/{metric}/{i}", step)
        if self.heatmaps:
            self._folder = self._folder or Path(trainer.log_dir or trainer.default_root_dir) / "layer_diagnostics"
            now = time.monotonic()
            self._drawn_at = now if self._drawn_at is None else self._drawn_at
            if now - self._drawn_at >= self.heatmap_seconds:  # drawing takes a second: not after every tiny step
                self.draw(trainer, self._folder)
                self._drawn_at = now

    def probe_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, list[float]]:
        """Block influence, contribution (and logit-lens KL) on the probe batch, without touching training."""
        batch = trainer.strategy.batch_to_device(self.probe)
        with measuring(pl_module, seed=0, cuda=batch_device(batch).type == "cuda"):
            mask = token_mask(batch)
            stats, outputs = probe_blocks(self._blocks, lambda: forward_batch(pl_module, batch), mask,
                                          keep_outputs=self.logit_lens)
            if self.logit_lens:
                stats["logit_lens_kl"] = logit_lens_kl(outputs, self._lens, mask)
        return stats

    def _snapshot_device(self, param: torch.Tensor) -> torch.device:
        return torch.device(self.snapshot_device) if self.snapshot_device else param.device

    def _take_snapshot(self) -> None:
        self.snapshot = [[p.detach().to(self._snapshot_device(p), copy=True) for p in params]
                         for params in self._groups]

    def _update_ratios(self) -> list[float]:
        ratios = []
        for params, before in zip(self._groups, self.snapshot, strict=True):
            diff = sum(float((p.detach().float() - w.to(p.device).float()).pow(2).sum())
                       for p, w in zip(params, before, strict=True))
            norm = sum(float(p.detach().float().pow(2).sum()) for p in params)
            ratios.append(math.sqrt(diff) / max(math.sqrt(norm), 1e-12))
        return ratios

    # ----------------------------------------------------------------------------------------------- drawing
    @rank_zero_only
    def draw(self, trainer: L.Trainer, folder: str | Path) -> dict[str, Path]:
        """Draw one heatmap per metric into ``folder`` (PNG) and send it to W&B / TensorBoard."""
        folder = Path(folder)
        paths = {}
        for metric, rows in self.history.items():
            marks = {} if metric in ("trained", "ran") else {"trained": self.history.get("trained"),
                                                              "ran": self.history.get("ran")}
            path = folder / f"{metric}.png"
            image = draw_heatmap(rows, self.steps, f"layers/{metric}", path, **marks)
            paths[metric] = path
            log_image(trainer.loggers, f"layers/{metric}_heatmap", image, step=trainer.global_step)
        return paths

    # ---------------------------------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict:
        state = {"probe": self.probe, "steps": list(self.steps), "history": self.history,
                 "counts": [list(self._trained), list(self._ran), self._opt_steps, self._batches]}
        if self.update_ratio:
            state["snapshot"] = self.snapshot
        return state

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.probe = state_dict["probe"]
        self.steps = list(state_dict["steps"])
        self.history = {k: [list(r) for r in v] for k, v in state_dict["history"].items()}
        trained, ran, self._opt_steps, self._batches = state_dict["counts"]
        self._trained, self._ran = list(trained), list(ran)
        self.snapshot = state_dict.get("snapshot") if self.update_ratio else None


def batch_device(batch) -> torch.device:
    """The device of the first tensor in ``batch``."""
    found = []
    apply_to_collection(batch, torch.Tensor, lambda t: found.append(t.device))
    return found[0] if found else torch.device("cpu")


def _logit_lens(pl_module: nn.Module, parts) -> Callable[[torch.Tensor], torch.Tensor]:
    """``h -> head(final_norm(h))`` for a Hugging Face causal LM."""
    head = None
    for module in pl_module.modules():
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter) and hasattr(module, "config"):
            head = getter()
            if head is not None:
                break
    if head is None or not parts.final_norm:
        raise ValueError(f"logit_lens=True needs a causal LM with a final norm and an output head; "
                         f"{type(pl_module).__name__} has head={type(head).__name__ if head else None}, "
                         f"final norm parameters {parts.final_norm}")
    norm = pl_module.get_submodule(parts.final_norm[0].rsplit(".", 1)[0])
    return lambda h: head(norm(h))
