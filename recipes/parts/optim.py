"""Optimizer set-up for every recipe: named parameter groups, the warm-up + cosine schedule, the MAE LR scaling rule.

Groups are named (``decay``/``no_decay``, ``layer_<id>_decay``) so learning-rate logging keys stay stable.

ViT layer-wise LR decay:
Layer ids follow the MAE / BEiT / timm convention (MAE ``util/lr_decay.py``): ``cls_token``, ``pos_embed``,
``patch_embed`` (and register tokens) are layer 0, ``blocks.i`` is layer ``i + 1`` and everything after the
blocks (final norm, ``fc_norm``, head) is layer ``L + 1``; a layer's LR scale is ``decay ** (L + 1 - layer_id)``.
Biases, norm weights and the position/class tokens get no weight decay.
"""

from __future__ import annotations

import math

import lightning as L
from torch import nn

_EMBED_PREFIXES = ("cls_token", "reg_token", "dist_token", "pos_embed", "patch_embed", "mask_token")


def no_weight_decay(name: str, param: nn.Parameter, skip: set[str] = frozenset()) -> bool:
    """True for biases, norm weights (1-D) and the named tokens, which MAE trains without weight decay."""
    return param.ndim == 1 or name in skip or name.split(".")[0] in ("cls_token", "reg_token", "pos_embed")


def vit_layer_id(name: str, num_blocks: int) -> int:
    """MAE / timm layer id of a ViT parameter name: embeddings 0, ``blocks.i`` -> ``i + 1``, the rest ``L + 1``."""
    if name.split(".")[0] in _EMBED_PREFIXES:
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups ``layer_<id>_decay`` / ``layer_<id>_no_decay`` with ``lr = lr * layer_decay**(L+1-id)``.

    Every group carries ``lr_scale`` (for logging and tests) and an explicit ``lr``, so a ``LambdaLR`` warm-up
    and cosine multiply each group's own scaled learning rate.
    """
    num_blocks = len(model.blocks)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = vit_layer_id(name, num_blocks)
        decay = not no_weight_decay(name, param, skip)
        key = f"layer_{layer}_{'decay' if decay else 'no_decay'}"
        if key not in groups:
            scale = layer_decay ** (num_blocks + 1 - layer)
            groups[key] = {"name": key, "params": [], "param_names": [], "lr_scale": scale, "lr": lr * scale,
                           "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The two MAE pre-training groups ``decay`` / ``no_decay`` over the trainable parameters (frozen ones left out)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def effective_batch_size(trainer: L.Trainer, batch_size: int | None = None) -> int:
    """Images per optimizer step: per-device batch (given, or the data module's ``batch_size``) x devices x accum."""
    if batch_size is None:
        datamodule = getattr(trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None)
        if batch_size is None:
            raise RuntimeError("The lr = base_lr * batch / 256 rule needs the batch size: use a data module with a "
                               "`batch_size` attribute or pass `lr` (absolute) instead of `base_lr`")
    return int(batch_size) * trainer.world_size * trainer.accumulate_grad_batches


def scaled_lr(base_lr: float, batch: int) -> float:
    """The linear scaling rule of MAE: ``lr = base_lr * batch / 256``."""
    return base_lr * batch / 256


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


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier at optimizer step ``step``: ``(step + 1) / warmup`` in warm-up, then cosine to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
