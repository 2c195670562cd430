"""LightningModules, the CLI entry point and one YAML per recipe (imported lazily)."""

import importlib

_EXPORTS = {
    "CausalLMModule": "recipes.causal_lm",
    "LoraSettings": "recipes.causal_lm",
    "GRPOModule": "recipes.grpo",
    "MAEPretrainModule": "recipes.mae_pretrain",
    "ViTClassifierModule": "recipes.vit_classifier",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'recipes' has no attribute {name!r}")
