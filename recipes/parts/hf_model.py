"""Shared by the causal-LM recipes: find the tokenizer, build the Hugging Face model it belongs with."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

# A small Llama that trains on the synthetic tasks on a laptop CPU in minutes.
DEFAULT_MODEL_CONFIG = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256, "tie_word_embeddings": False,
}


def module_tokenizer(module: L.LightningModule) -> PreTrainedTokenizerBase:
    """``module.tokenizer`` if set, else the attached data module's tokenizer (remembered on the module)."""
    if module.tokenizer is None:
        datamodule = getattr(module._trainer, "datamodule", None) if module._trainer else None
        if datamodule is None or not hasattr(datamodule, "tokenizer"):
            raise RuntimeError(f"{type(module).__name__} needs a tokenizer: pass tokenizer_name=... or use a data "
                               "module that provides one (InstructionDataModule, VerifiableQADataModule)")
        module.tokenizer = datamodule.tokenizer
    return module.tokenizer


def build_causal_lm(model_path: str | None, model_config: dict | None, tokenizer: PreTrainedTokenizerBase,
                    dtype: torch.dtype | None = None, gradient_checkpointing: bool = False) -> PreTrainedModel:
    """A local ``from_pretrained`` directory, or a random-init model from ``AutoConfig.for_model`` arguments
    (``model_type`` plus fields; ``vocab_size`` from the tokenizer). Never touches the network.

    The weights are created directly in ``dtype``, by default torch's default dtype: inside Lightning's
    ``configure_model`` that is the training precision's (bf16 under ``bf16-true``, fp32 under ``bf16-mixed``,
    whose master weights are fp32), so a bf16 checkpoint trained in ``bf16-true`` is never held in fp32.

    The model is returned in train mode, dropout as its config says: ``from_pretrained`` returns eval mode and
    Lightning keeps the modes it finds, so a loaded model would otherwise train without dropout and without
    gradient checkpointing (which Hugging Face applies only in train mode). Generation and measurements switch
    to eval mode for their own duration (``callbacks.core.modes``). ``gradient_checkpointing`` recomputes the
    blocks' activations in backward (:func:`enable_activation_checkpointing`).
    """
    dtype = dtype or torch.get_default_dtype()
    if model_path is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as err:
            if Path(model_path).exists():
                raise
            raise FileNotFoundError(f"model_path {model_path!r} does not exist: pass a local directory saved with "
                                    "save_pretrained() (nothing is downloaded)") from err
    else:
        cfg = dict(model_config or DEFAULT_MODEL_CONFIG)
        for key in ("bos_token_id", "eos_token_id"):  # the tokenizer's, not the family's (GPT-2's 50256)
            cfg.setdefault(key, getattr(tokenizer, key, None))
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg,
                                                                      vocab_size=len(tokenizer)), dtype=dtype)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(f"The model's vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller "
                         f"than the tokenizer's ({len(tokenizer)}); use the model's own tokenizer")
    model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def enable_activation_checkpointing(model: PreTrainedModel, use_reentrant: bool = False) -> None:
    """Recompute block activations in backward (transformers 5 ``activation_checkpointing_enable``; older releases
    only have ``gradient_checkpointing_enable``, which transformers 5 deprecates)."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_sequence_lengths(model: PreTrainedModel, lengths: dict[str, int]) -> None:
    """``ValueError`` naming each ``argument: length`` longer than the model's positions (its config's
    ``max_position_embeddings`` / ``n_positions``), before a library fails on a position it has no embedding for."""
    config = model.config
    limit = next(((key, getattr(config, key)) for key in POSITION_KEYS
                  if isinstance(getattr(config, key, None), int) and getattr(config, key) > 0), None)
    if limit is None:
        return
    key, positions = limit
    too_long = {name: n for name, n in lengths.items() if n > positions}
    if too_long:
        listed = "; ".join(f"{name} = {n}" for name, n in too_long.items())
        raise ValueError(f"{listed}: longer than the model's {key}={positions} token positions; expected at most "
                         f"{positions}. Lower it, or use a model (model_config) with more positions")
