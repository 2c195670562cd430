"""The per-token batch a GRPO loss term (e.g. ``callbacks.LLDS``) receives for one mini-batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PolicyTokens:
    """What a registered loss term sees for one mini-batch (all [n, T] unless noted; only ``logp`` has grad).

    ``action_mask`` marks the model's own tokens (for multi-turn data with tool outputs in between, each
    contiguous run is one action / turn); for single-turn completions it equals ``mask``. ``answer_mask`` marks
    the final answer's tokens when a term asked for it (``None`` otherwise).
    """

    logp: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    advantages: torch.Tensor  # [n]
    mask: torch.Tensor
    action_mask: torch.Tensor
    answer_mask: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # [n] bool; False for completions whose reward was dropped
