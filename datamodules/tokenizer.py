"""Tokenizers: any local Hugging Face tokenizer directory, or a small built-in character-level one.

The built-in tokenizer is a real ``PreTrainedTokenizerFast`` (built with the ``tokenizers`` library) with a
chat template, so the embedded default goes through exactly the code path a Llama or Qwen tokenizer would.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

CHAR_TOKENIZER = "char"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with a minimal chat template."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(name_or_path: str = CHAR_TOKENIZER) -> PreTrainedTokenizerBase:
    """Load ``"char"`` (the built-in tokenizer) or a local Hugging Face tokenizer directory, never the network."""
    if name_or_path == CHAR_TOKENIZER:
        return build_char_tokenizer()
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(f"Tokenizer directory {name_or_path!r} does not exist; pass a local directory "
                                f"saved with save_pretrained(), or {CHAR_TOKENIZER!r} for the built-in tokenizer")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def require_chat_template(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Fail early with a useful message when a tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"The tokenizer {where} has no chat template; set tokenizer.chat_template (a Jinja string) "
                         "or use a chat/instruct model's tokenizer")
