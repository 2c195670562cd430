"""The recipes: LightningModules, the commands of ``python -m recipes`` and one YAML per recipe.

- ``causal_lm``: ``CausalLMModule``, fine-tuning any Hugging Face causal LM (full or LoRA).
- ``grpo``: the GRPO package (``GRPOModule``, its loss, rollouts, log-probs, SFT start and checks).
- ``mae_pretrain``: ``MAEPretrainModule``, masked-autoencoder pre-training of a timm ViT.
- ``vit_classifier``: ``ViTClassifierModule``, multi-label ViT fine-tuning with layer-wise LR decay.
- ``__main__``: ``python -m recipes <command>``: the table of commands.
- ``cli``: ``RecipesCLI``, the LightningCLI behind ``fit``/``validate``/``test``, and the recipe lookup.
- ``commands``: ``demo``, ``export``, ``restore``, ``diversity``.
- ``checkpoints``: the one reader of our Lightning checkpoints.
- ``resume``: which checkpoint ``--ckpt_path last|auto`` takes and which settings must match.
- ``resume_rule``: the resume rule for the run around the model (trainer, seed, callbacks: the training method).
- ``parts``: building blocks the modules share.
- ``configs/``: one YAML per recipe (``python -m recipes list``).

The module classes are imported lazily (``recipes.CausalLMModule``), so a YAML only imports what it uses.
"""

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
