"""Turn chat messages into token ids with labels on the assistant's tokens only, and pad batches of them."""

from __future__ import annotations

import re

import torch
from transformers import PreTrainedTokenizerBase

from datamodules.jsonl_records import DataError

IGNORE_INDEX = -100


_SLOT = re.compile("\ue000(\\d+)\ue001")  # a message's place in a rendered template (private-use characters)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def control_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Texts the tokenizer would turn into a control token if they appeared in data (``</s>``, ``<|im_end|>``...)."""
    found = set(tokenizer.all_special_tokens)
    found |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted(found)


class _Rendered:
    """A rendered conversation as (text, is_message_content) pieces, so message text that spells a control
    token can be tokenized as text while the template's own markup keeps its control tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool,
                 where: str) -> None:
        self.tokenizer = tokenizer
        self.text = _render(tokenizer, messages, generation_prompt)
        spelled = sorted({c for c in control_strings(tokenizer) for m in messages if c in m["content"]})
        if not spelled:
            self.pieces = [(self.text, False)]
            return
        slots = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        parts = _SLOT.split(_render(tokenizer, slots, generation_prompt))
        self.pieces = [(messages[int(p)]["content"], True) if k % 2 else (p, False) for k, p in enumerate(parts)]
        if "".join(text for text, _ in self.pieces) != self.text:
            raise DataError(f"{where}: a message spells the control token(s) {spelled}, and the chat template "
                            "changes message text, so it cannot be kept apart from the template's own tokens; "
                            "remove or escape that text")

    def encode(self, start: int, end: int) -> list[int]:
        """Token ids of ``text[start:end]``: message content with control-token spellings split into plain text."""
        ids, offset = [], 0
        for text, content in self.pieces:
            a, b = max(start, offset), min(end, offset + len(text))
            if a < b:
                ids += self.tokenizer(text[a - offset:b - offset], add_special_tokens=False,
                                      split_special_tokens=content)["input_ids"]
            offset += len(text)
        return ids


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, ids: list[int], messages: list[dict], where: str) -> None:
    """A ``DataError`` naming the record and the characters when any text became the unknown token."""
    unk = tokenizer.unk_token_id
    if unk is None or unk not in ids:
        return
    text = "".join(m["content"] for m in messages)
    missing = sorted({ch for ch in text
                      if unk in tokenizer(ch, add_special_tokens=False, split_special_tokens=True)["input_ids"]})
    raise DataError(f"{where}: the tokenizer cannot encode the character(s) {missing or '(in the template)'}; they "
                    f"would be trained as {tokenizer.unk_token!r}. Use a tokenizer that covers them (a local Hugging "
                    "Face tokenizer directory) or remove them from the data")


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_length: int, where: str
) -> dict[str, list[int]]:
    """Token ids of the rendered conversation; ``labels`` copy the assistant turns and mask everything else.

    The conversation is rendered through the chat template one turn at a time; the text each assistant turn
    adds is trained, the text before it (system, user, template markup, generation prompt) is masked. Message
    text that spells a control token (``</s>``, ``<|im_end|>``) is tokenized as plain text, never as the control
    token; characters the tokenizer cannot encode are a ``DataError`` naming the record.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _Rendered(tokenizer, messages[:i], True, where)
        full = _Rendered(tokenizer, messages[: i + 1], False, where)
        if not (prompt.text.startswith(rendered) and full.text.startswith(prompt.text)):
            raise DataError(f"{where}: the tokenizer's chat template does not render turns as prefixes of each "
                            "other, so response tokens cannot be located")
        for ids, trained in ((prompt.encode(len(rendered), len(prompt.text)), False),
                             (full.encode(len(prompt.text), len(full.text)), True)):
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        rendered = full.text
    check_vocabulary(tokenizer, input_ids, messages, where)
    first_response = next((j for j, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    if first_response >= max_length:
        raise DataError(f"{where}: the prompt is {first_response} tokens, not shorter than max_length={max_length}; "
                        "no response token would be trained. Raise max_length or shorten the prompt")
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str = "") -> list[int]:
    """Token ids of the conversation up to (and including) the generation prompt of the final assistant turn."""
    rendered = _Rendered(tokenizer, messages[:-1], True, where)
    ids = rendered.encode(0, len(rendered.text))
    check_vocabulary(tokenizer, ids, messages[:-1], where)
    return ids


def pad(sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad integer lists to one length (right by default, left for generation prompts)."""
    width = max(len(s) for s in sequences)
    rows = [[value] * (width - len(s)) + s if left else s + [value] * (width - len(s)) for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


def collate_examples(examples: list[dict], pad_token_id: int) -> dict:
    """Right-padded ``input_ids``/``attention_mask``/``labels``; left-padded prompts and answers when present."""
    batch = {
        "input_ids": pad([e["input_ids"] for e in examples], pad_token_id),
        "attention_mask": pad([[1] * len(e["input_ids"]) for e in examples], 0),
        "labels": pad([e["labels"] for e in examples], IGNORE_INDEX),
    }
    if "prompt_ids" in examples[0]:
        batch["prompt_input_ids"] = pad([e["prompt_ids"] for e in examples], pad_token_id, left=True)
        batch["prompt_attention_mask"] = pad([[1] * len(e["prompt_ids"]) for e in examples], 0, left=True)
        batch["answers"] = [e["answer"] for e in examples]
    return batch
