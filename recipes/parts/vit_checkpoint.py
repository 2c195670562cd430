"""Load ViT encoder weights for fine-tuning: an MAE export, an MAE Lightning checkpoint, or any timm checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from torch import nn


def read_encoder_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Encoder weights with timm key names from ``path``.

    Accepts a plain ``state_dict`` (``MAEPretrainModule.export_encoder_to``, timm ``save``), a dict holding it under
    ``state_dict`` or ``model`` (Lightning, MAE/DeiT checkpoints); keys under ``encoder.`` (a Lightning checkpoint of
    ``MAEPretrainModule``) are taken with the prefix removed and the rest (decoder) dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {path} does not exist")
    # Local files the user names; Lightning checkpoints carry hyper-parameter objects, so not weights_only.
    obj = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state_dict (name -> tensor), or a dict with one under "
                         "'state_dict' or 'model'")
    if any(k.startswith("encoder.") for k in obj):
        obj = {k[len("encoder."):]: v for k, v in obj.items() if k.startswith("encoder.")}
    return dict(obj)


def load_encoder_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load encoder weights into a timm ViT classifier; returns the parameter names left at their fresh init.

    The classification head is never loaded (different label set). As in MAE's fine-tuning code, with global
    average pooling the pre-training ``norm`` is dropped and ``fc_norm`` starts fresh. Position embeddings are
    resampled to the model's grid and the patch embedding is adapted to its input channels when they differ;
    anything else missing or unexpected is an error naming the keys.
    """
    state = {k: v for k, v in read_encoder_state_dict(path).items() if not k.startswith("head.")}
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=prefix)
    proj = "patch_embed.proj.weight"
    if proj in state and state[proj].shape[1] != model.patch_embed.proj.weight.shape[1]:
        state[proj] = adapt_input_conv(model.patch_embed.proj.weight.shape[1], state[proj],
                                       base_chans=state[proj].shape[1])
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh_ok = ("head.", "fc_norm.") if isinstance(model.norm, nn.Identity) else ("head.",)
    dropped_ok = ("norm.",) if isinstance(model.norm, nn.Identity) else ("fc_norm.",)
    bad_missing = [k for k in missing if not k.startswith(fresh_ok)]
    bad_unexpected = [k for k in unexpected if not k.startswith(dropped_ok)]
    if bad_missing or bad_unexpected:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing {bad_missing[:8]}, unexpected "
                         f"{bad_unexpected[:8]}; build the classifier with the same model_name / model_kwargs as "
                         "the checkpoint")
    return list(missing)
