"""A local model zoo: tiny random-init models of the families users bring, saved as a user's model would be.

Each family is a ``save_pretrained`` folder with a tokenizer of its kind, trained here with the ``tokenizers`` library
(byte-level BPE for Llama 3 / Qwen / GPT-2 / Granite, SentencePiece-style Metaspace BPE for Mistral / Gemma / Phi-3),
the family's chat markup written by us (Llama 3 headers, ChatML, ``[INST]``, ``<start_of_turn>``, ``<|user|>``...)
and its special tokens (BOS / EOS / PAD) in the tokenizer and the model config. Nothing is downloaded.

``build_zoo(root)`` writes every family under ``root/<family>`` (the session fixture ``model_zoo`` in conftest);
``CheckpointCounter`` counts the checkpointed block calls of a model.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn

# a corpus close to the synthetic tasks, every printable character included so nothing becomes <unk>
CORPUS = ["What is 12 + 30? The answer is 42.", "Reverse the word: hello -> olleh", "so 3 + 4 = 7\n#### 7",
          "Sort the letters: dcba -> abcd", "Copy: the quick brown fox", "A multiple-choice answer: (B)",
          string.printable] * 10

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
           "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}"
         "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
         "{% endif %}")
PHI3 = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
GPT2 = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
        "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
GRANITE = ("{% for m in messages %}<|start_of_role|>{{ m['role'] }}<|end_of_role|>{{ m['content'] }}"
           "<|end_of_text|>\n{% endfor %}{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>"
           "{% endif %}")


@dataclass
class Family:
    """One family: its config class and fields, its tokenizer's kind, special tokens and chat template."""

    config: Callable[..., transformers.PretrainedConfig]
    fields: dict
    kind: str  # "byte" (byte-level BPE) or "metaspace" (SentencePiece-style BPE)
    specials: dict  # bos / eos / pad / unk -> token text (None: the family has none)
    template: str
    markup: list[str] = field(default_factory=list)  # more control tokens of the chat markup
    layers_key: str = "num_hidden_layers"


_LM = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
       "max_position_embeddings": 128}
FAMILIES: dict[str, Family] = {
    "llama3": Family(transformers.LlamaConfig, {**_LM, "attention_dropout": 0.1, "tie_word_embeddings": False}, "byte",
                     {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>"}, LLAMA3,
                     ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"]),
    "qwen2": Family(transformers.Qwen2Config, {**_LM, "attention_dropout": 0.1, "tie_word_embeddings": True}, "byte",
                    {"eos": "<|im_end|>", "pad": "<|endoftext|>"}, CHATML, ["<|im_start|>"]),
    "qwen3": Family(transformers.Qwen3Config, {**_LM, "head_dim": 16, "attention_dropout": 0.1,
                                               "tie_word_embeddings": True}, "byte",
                    {"eos": "<|im_end|>", "pad": "<|endoftext|>"}, CHATML, ["<|im_start|>"]),
    "mistral": Family(transformers.MistralConfig, {**_LM, "attention_dropout": 0.1, "sliding_window": None},
                      "metaspace", {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}, MISTRAL,
                      ["[INST]", "[/INST]"]),
    "gemma2": Family(transformers.Gemma2Config, {**_LM, "head_dim": 16, "attention_dropout": 0.1,
                                                 "query_pre_attn_scalar": 16, "sliding_window": 16,
                                                 "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
                     "metaspace", {"bos": "<bos>", "eos": "<end_of_turn>", "pad": "<pad>", "unk": "<unk>"}, GEMMA,
                     ["<start_of_turn>", "<eos>"]),
    "phi3": Family(transformers.Phi3Config, {**_LM, "attention_dropout": 0.1, "resid_pdrop": 0.1,
                                             "pad_token_id": None}, "metaspace",
                   {"bos": "<s>", "eos": "<|end|>", "pad": "<|endoftext|>", "unk": "<unk>"}, PHI3,
                   ["<|user|>", "<|assistant|>", "<|system|>"]),
    "gpt2": Family(transformers.GPT2Config, {"n_embd": 32, "n_head": 2, "n_positions": 128}, "byte",
                   {"bos": "<|endoftext|>", "eos": "<|endoftext|>"}, GPT2, layers_key="n_layer"),
    "granite": Family(transformers.GraniteConfig, {**_LM, "attention_dropout": 0.1, "logits_scaling": 4.0,
                                                   "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                                   "attention_multiplier": 0.25}, "byte",
                      {"eos": "<|end_of_text|>", "pad": "<|pad|>"}, GRANITE,
                      ["<|start_of_role|>", "<|end_of_role|>"]),
}


def build_tokenizer(family: Family, vocab_size: int = 320) -> transformers.PreTrainedTokenizerFast:
    """A BPE tokenizer of the family's kind trained on ``CORPUS``, with its special tokens and chat template."""
    specials = [t for t in family.specials.values() if t] + family.markup
    specials = list(dict.fromkeys(specials))
    if family.kind == "byte":
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        core.post_processor = processors.ByteLevel(trim_offsets=True)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        core = Tokenizer(models.BPE(unk_token=family.specials["unk"]))
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = []
    bpe = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                              show_progress=False)
    core.train_from_iterator(CORPUS, bpe)
    named = {f"{k}_token": v for k, v in family.specials.items() if v}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, **named,
                                               additional_special_tokens=family.markup)
    tok.chat_template = family.template
    return tok


def build_model(family: Family, tok: transformers.PreTrainedTokenizerBase, layers: int = 3,
                seed: int = 0) -> transformers.PreTrainedModel:
    """A random-init causal LM of the family (seeded), vocabulary rounded up to a multiple of 64 like real models,
    with the tokenizer's BOS / EOS / PAD ids in its config."""
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(v) for k, v in family.specials.items() if v and k != "unk"}
    ids.setdefault("pad_token_id", None)
    config = family.config(**{**ids, **family.fields, family.layers_key: layers,
                              "vocab_size": -(-len(tok) // 64) * 64})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def build_zoo(root: Path, families: dict[str, Family] = FAMILIES) -> dict[str, Path]:
    """Every family saved (model and tokenizer, ``save_pretrained``) under ``root/<name>``."""
    folders = {}
    for name, family in families.items():
        tok = build_tokenizer(family)
        model = build_model(family, tok)
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    return folders


class CheckpointCounter:
    """Counts the calls of every module's gradient-checkpointing function (Hugging Face calls it for a block only
    when checkpointing is enabled, the block is in train mode and grad is on)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.wrapped = 0
        for module in model.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is not None and getattr(module, "gradient_checkpointing", False):
                module._gradient_checkpointing_func = self._counting(func)
                self.wrapped += 1

    def _counting(self, func: Callable) -> Callable:
        def counted(*args, **kwargs):
            self.calls += 1
            return func(*args, **kwargs)
        return counted
