"""Training throughput on the dashboard: samples/s, tokens/s and model FLOPs utilization, per device.

Built on Lightning's ``Throughput`` (rolling averages over ``window_size`` steps). The clock runs during training
only: validation inside ``fit`` is left out, data loading is in. Per step it counts

- samples: the rows of the batch (``input_ids``, GRPO's ``prompt_input_ids``, ``image``, or the first tensor);
- tokens: the batch's tokens that are not padding (``attention_mask``, or ``num_tokens`` of a packed batch);
  batches without token ids (images, GRPO prompts, whose work is generation) log no tokens/s;
- FLOPs: the usual estimate 6 x N x tokens for a training step (forward 2N, backward 4N; Kaplan et al. 2020), N
  the parameters that multiply (all but the token-embedding lookup, whatever is frozen: MFU is the model's
  FLOPs, so a method that skips work shows as a higher MFU, the share of wall-clock saved). The attention term
  is left out (a few percent at 1-2k tokens). MFU divides by the device's dense peak for the precision used
  (``peak_flops``: Lightning's table, with our own dense Hopper figures); on the CPU or an unknown card there is no
  MFU.

Metrics: ``throughput/samples_per_sec``, ``throughput/tokens_per_sec``, ``throughput/flops_per_sec`` and
``throughput/mfu`` (each per device).
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

log = logging.getLogger(__name__)

# Dense tensor-core peaks of Hopper cards in FLOP/s. NVIDIA's data sheets print the "with sparsity" figures, twice
# these; Lightning's table lists the H200 (and H100 NVL) with the sparse ones and does not know every name a driver
# reports ("NVIDIA H200", "NVIDIA H100"), so MFU on those cards would read half its value or be missing.
_HOPPER_DENSE = {
    "sxm": {torch.float32: 67e12, "tfloat32": 494.7e12, torch.bfloat16: 989.4e12, torch.float16: 989.4e12},
    "nvl": {torch.float32: 60e12, "tfloat32": 417.5e12, torch.bfloat16: 835.5e12, torch.float16: 835.5e12},
}

_NAMES = {"device/samples_per_sec": "samples_per_sec", "device/items_per_sec": "tokens_per_sec",
          "device/flops_per_sec": "flops_per_sec", "device/mfu": "mfu"}


def batch_samples(batch: Any) -> int:
    """Rows of a training batch: a dict of token ids or images, an ``(inputs, ...)`` tuple, or a tensor."""
    if isinstance(batch, dict):
        for key in ("input_ids", "prompt_input_ids", "image"):
            if key in batch:
                return int(batch[key].shape[0])
        batch = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return int(batch.shape[0])


def batch_tokens(batch: Any) -> int | None:
    """Tokens of a batch of token ids that are not padding; ``None`` for other batches."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        return None
    if "num_tokens" in batch:
        return int(batch["num_tokens"].sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def matmul_parameters(model: nn.Module) -> int:
    """Parameters that take part in matrix products: all but token-embedding tables (a tied embedding counts
    once, as the output head)."""
    in_linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    lookups = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in model.parameters() if id(p) not in lookups or id(p) in in_linear)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak FLOP/s for matmuls in ``dtype`` (float32 counts as TF32 unless
    ``torch.get_float32_matmul_precision()`` is "highest", as in Lightning), or ``None`` where unknown (the CPU, a
    card in neither table: logged once at info level instead of Lightning's warning)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    hopper = "h200" in name or ("h100" in name and "pcie" not in name and "hbm2e" not in name)
    if hopper:
        row = _HOPPER_DENSE["nvl" if "nvl" in name else "sxm"]
        if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
            return row["tfloat32"]
        return row.get(dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FLOPs not found")  # said once below, at info level
        peak = get_available_flops(device, dtype)
    if peak is None:
        log.info("No peak FLOP/s known for %r: throughput/mfu is not logged", torch.cuda.get_device_name(device))
    return peak


def compute_dtype(precision: str | None) -> torch.dtype:
    """The matmul dtype of a Lightning precision setting (``bf16-mixed``, ``16-true``, ``32-true``...)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32


class ThroughputLogger(Callback):
    """Log samples/s, tokens/s and MFU of training (see the module docstring for what is counted).

    Args:
        window_size: steps the rolling averages run over (the first values appear after this many steps).
    """

    def __init__(self, window_size: int = 20) -> None:
        if window_size < 2:
            raise ValueError(f"window_size must be at least 2 steps, got {window_size}")
        self.window_size = window_size
        self._throughput: Throughput | None = None
        self._parameters = 0
        self._clock = 0.0
        self._elapsed = 0.0
        self._counts = [0, 0, 0]  # batches, samples, tokens

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak = peak_flops(trainer.strategy.root_device, compute_dtype(trainer.precision))
        self._throughput = Throughput(available_flops=peak, world_size=1, window_size=self.window_size)
        self._parameters = matmul_parameters(pl_module)
        self._elapsed, self._counts = 0.0, [0, 0, 0]
        self._clock = self._now(trainer)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._throughput is None:
            return
        now = self._now(trainer)
        self._elapsed += now - self._clock
        self._clock = now
        tokens = batch_tokens(batch)
        self._counts[0] += 1
        self._counts[1] += batch_samples(batch)
        self._counts[2] += tokens or 0
        self._throughput.update(time=self._elapsed, batches=self._counts[0], samples=self._counts[1],
                                lengths=None if tokens is None else self._counts[2],
                                flops=None if tokens is None else 6 * self._parameters * tokens)
        metrics = {f"throughput/{_NAMES[k]}": float(v) for k, v in self._throughput.compute().items() if k in _NAMES}
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._throughput is not None and not trainer.sanity_checking:
            self._elapsed += self._now(trainer) - self._clock  # the clock stops for validation

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._throughput is not None and not trainer.sanity_checking:
            self._clock = self._now(trainer)

    @staticmethod
    def _now(trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
