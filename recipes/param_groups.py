"""Named optimizer parameter groups, so learning-rate logging keys stay stable across runs and callbacks."""

from __future__ import annotations

from torch import nn


def decay_groups(model: nn.Module, weight_decay: float | None = None) -> list[dict]:
    """Two groups over the trainable parameters: ``decay`` (matrices) and ``no_decay`` (biases, norms, 1-D).

    ``weight_decay`` (when given) is set on the ``decay`` group; ``no_decay`` always has weight decay 0.
    Frozen parameters at build time (e.g. a LoRA base model) are left out.
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]
    if weight_decay is not None:
        groups[0]["weight_decay"] = weight_decay
    return [g for g in groups if g["params"]]
