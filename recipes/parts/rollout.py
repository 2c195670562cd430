"""A GRPO rollout batch as one named structure, and the answer-token mask some loss terms need."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class Rollout:
    """One rollout batch, prompt-major (the G completions of a prompt are consecutive); N = prompts x G rows.

    ``loss_mask`` is the completion mask with completions whose reward failed zeroed; ``old_logp`` / ``ref_logp``
    are the per-token log-probs of the rollout policy and the frozen reference, filled in by ``rollout_logprobs``.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion: torch.Tensor
    cmask: torch.Tensor
    rewards: torch.Tensor
    correct: torch.Tensor
    valid: torch.Tensor
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    answer_mask: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.completion.shape[0]


def answer_token_mask(tokenizer: PreTrainedTokenizerBase, completion: torch.Tensor, cmask: torch.Tensor,
                      texts: list[str]) -> torch.Tensor:
    """Tokens of the final answer: from the last ``####`` (or the last line) to the end of the completion."""
    out = torch.zeros_like(cmask, dtype=torch.bool)
    for i, text in enumerate(texts):
        start = text.rfind("####")
        start = text.rfind("\n") + 1 if start < 0 else start
        n = int(cmask[i].sum())
        ids = completion[i, :n].tolist()
        for t in range(n):
            if len(tokenizer.decode(ids[:t + 1], skip_special_tokens=True)) > start:
                out[i, t:n] = True
                break
    return out & cmask.bool()
