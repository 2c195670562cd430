"""Optimizer set-up for every recipe: named parameter groups, the warm-up + cosine schedule, the MAE LR scaling rule.

Groups are named (``decay``/``no_decay``, ``layer_<id>_decay``) and every scheduler config is named ``optim/lr``, so
Lightning's ``LearningRateMonitor`` logs ``optim/lr/<group>``.
"""

from __future__ import annotations

import math
from functools import partial

import lightning as L
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def decay_groups(model: nn.Module, weight_decay: float | None = None, skip: set[str] = frozenset()) -> list[dict]:
    """Two groups over the trainable parameters: ``decay`` (matrices) and ``no_decay`` (biases, norms, 1-D, ``skip``).

    ``weight_decay`` (when given) is set on the ``decay`` group, otherwise the optimizer's default applies;
    ``no_decay`` always has weight decay 0. Frozen parameters at build time (e.g. a LoRA base model) are left out.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name in skip else decay).append(param)
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]
    if weight_decay is not None:
        groups[0]["weight_decay"] = weight_decay
    return [g for g in groups if g["params"]]


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """ViT layer-wise LR decay groups from timm's ``param_groups_layer_decay`` (BEiT / MAE fine-tuning).

    Layer ids follow MAE's ``util/lr_decay.py``: class/register tokens, position and patch embeddings are layer 0,
    ``blocks.i`` is layer ``i + 1`` and the rest (``fc_norm``, head) layer ``L + 1``; a group trains at
    ``lr * layer_decay ** (L + 1 - id)``. Biases, norm weights and ``model.no_weight_decay()`` (the tokens and
    position embedding) get no weight decay. With global average pooling (the recipes' setting) timm gives exactly
    these groups; with ``global_pool="token"`` timm ranks the final ``norm`` with the last block
    (``lr * layer_decay``) where MAE's rule would put it with the head.

    Each group gets a ``name`` (``layer_<id>_decay`` / ``layer_<id>_no_decay``, timm's own layer ids) and an
    explicit ``lr``, so a ``LambdaLR`` warm-up and cosine multiply each group's scaled learning rate.
    """
    no_wd = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_wd,
                                      layer_decay=layer_decay)
    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)  # the ids timm used above
    last = max(layer_of.values())
    name_of = {id(p): (n, p) for n, p in model.named_parameters()}
    for group in groups:
        name, param = name_of[id(group["params"][0])]
        kind = "no_decay" if param.ndim <= 1 or name in no_wd else "decay"
        group["name"] = f"layer_{layer_of.get(name, last)}_{kind}"
        group["lr"] = lr * group["lr_scale"]
    return groups


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier at optimizer step ``step``: ``(step + 1) / warmup`` in warm-up, then cosine to ``min_ratio``.

    ``min_ratio=1`` gives warm-up then constant.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int,
                            min_ratio: float = 0.1) -> dict:
    """Lightning's ``lr_scheduler`` config: :func:`warmup_cosine` per optimizer step, logged as ``optim/lr``."""
    factor = partial(warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio)
    return {"scheduler": LambdaLR(optimizer, factor), "interval": "step", "name": "optim/lr"}


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
