"""Reading GRPO's starting point, a ``CausalLMModule`` checkpoint (e.g. the output of ``sft.yaml``): its architecture,
its weights and the data settings it was trained on. ``GRPOModule.start_from_sft`` is the one place that uses these."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recipes.checkpoints import CheckpointError, load_checkpoint


def read_sft_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (``state_dict``, ``hyper_parameters``, ``datamodule_hyper_parameters``), read by
    :func:`recipes.checkpoints.load_checkpoint`; a missing or unreadable file is a ``CheckpointError`` naming it."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"sft_checkpoint (a CausalLMModule checkpoint): {err}") from err
    ckpt.setdefault("hyper_parameters", {})
    return ckpt


def sft_architecture(ckpt: dict[str, Any]) -> tuple[str | None, dict | None]:
    """``(model_path, model_config)`` the SFT checkpoint's model was built from."""
    hp = ckpt["hyper_parameters"]
    return hp.get("model_path"), hp.get("model_config")


def sft_data_settings(ckpt: dict[str, Any]) -> dict:
    """The data module hyper-parameters the SFT checkpoint was trained with (empty when not recorded)."""
    return dict(ckpt.get("datamodule_hyper_parameters") or {})


def load_sft_weights(model: torch.nn.Module, ckpt: dict[str, Any], path: str | Path) -> None:
    """Copy the SFT checkpoint's weights into ``model``; every key must match (a LoRA checkpoint must be merged)."""
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model (a LoRA checkpoint must be exported merged first: "
                         f"python -m recipes export): missing {missing[:3]}, unexpected {unexpected[:3]}")
