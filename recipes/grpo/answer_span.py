"""The final-answer span of sampled completions, as a token mask, in time linear in the completion length.

The answer starts at the last ``####`` of the decoded completion (or at its last line when there is none); a token
belongs to the span when the decoded text up to and including it reaches past that character. Token boundaries in
the decoded text come from the tokenizer's offsets: the text is encoded once with ``return_offsets_mapping`` and,
when that gives back the sampled ids, the first token ending past the answer start is read off and confirmed with
two prefix decodes (one decode, one encode and two short decodes per completion). A tokenizer without offsets, a
sample the tokenizer would have split differently, or offsets that do not match the decoded prefixes (trimmed
whitespace) fall back to a binary search over decoded prefixes: ``O(log T)`` decodes instead of one per token.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase


def answer_start(text: str) -> int:
    """Character where the final answer starts: the last ``####``, else the start of the last line."""
    start = text.rfind("####")
    return text.rfind("\n") + 1 if start < 0 else start


def token_end_offsets(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int] | None:
    """``len(decode(ids[:t + 1], skip_special_tokens=True))`` for every ``t``, from one decode and one encode;
    ``None`` when the tokenizer has no offsets or re-encoding the text does not give back ``ids``."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    special = set(tokenizer.all_special_ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    kept = [i for i in ids if i not in special]
    if encoded["input_ids"] != kept:
        return None
    ends, end, k = [], 0, 0
    for token in ids:
        if token not in special:
            end = max(end, encoded["offset_mapping"][k][1])
            k += 1
        ends.append(end)
    return ends


def first_token_past(tokenizer: PreTrainedTokenizerBase, ids: list[int], start: int) -> int | None:
    """The first ``t`` whose decoded prefix ``ids[:t + 1]`` is longer than ``start`` characters (``None``: none).

    The offsets give a candidate, confirmed with two prefix decodes (offsets may be trimmed of whitespace or
    refer to a normalized text); without a confirmed candidate, a binary search over prefix lengths decides.
    """

    def past(t: int) -> bool:
        return len(tokenizer.decode(ids[:t + 1], skip_special_tokens=True)) > start

    ends = token_end_offsets(tokenizer, ids)
    if ends is not None:
        hint = next((t for t, end in enumerate(ends) if end > start), len(ids))
        if hint == len(ids) and not past(len(ids) - 1):
            return None
        if hint < len(ids) and past(hint) and (hint == 0 or not past(hint - 1)):
            return hint
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if past(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo if lo < len(ids) else None


def answer_mask(tokenizer: PreTrainedTokenizerBase, completion: torch.Tensor, cmask: torch.Tensor,
                texts: list[str]) -> torch.Tensor:
    """Bool mask [N, T] of the final-answer tokens of each completion (``texts`` are the decoded completions)."""
    out = torch.zeros_like(cmask, dtype=torch.bool)
    for i, text in enumerate(texts):
        n = int(cmask[i].sum())
        first = first_token_past(tokenizer, completion[i, :n].tolist(), answer_start(text))
        if first is not None:
            out[i, first:n] = True
    return out & cmask.bool()
