"""LightningModules, the CLI entry point and one YAML per recipe."""

from recipes.causal_lm import CausalLMModule, LoraSettings

__all__ = ["CausalLMModule", "LoraSettings"]
