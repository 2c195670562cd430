"""Turn chat messages into token ids with labels on the assistant's tokens only, and pad batches of them."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from datamodules.jsonl_records import DataError

IGNORE_INDEX = -100


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_length: int, where: str
) -> dict[str, list[int]]:
    """Token ids of the rendered conversation; ``labels`` copy the assistant turns and mask everything else.

    The conversation is rendered through the chat template one turn at a time; the text each assistant turn
    adds is trained, the text before it (system, user, template markup, generation prompt) is masked.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise DataError(f"{where}: the tokenizer's chat template does not render turns as prefixes of each "
                            "other, so response tokens cannot be located")
        for text, trained in ((prompt[len(rendered):], False), (full[len(prompt):], True)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        rendered = full
    first_response = next((j for j, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    if first_response >= max_length:
        raise DataError(f"{where}: the prompt is {first_response} tokens, not shorter than max_length={max_length}; "
                        "no response token would be trained. Raise max_length or shorten the prompt")
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation up to (and including) the generation prompt of the final assistant turn."""
    text = _render(tokenizer, messages[:-1], generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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
