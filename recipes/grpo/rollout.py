"""A GRPO rollout batch as one named structure."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def inputs(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, ...]:
        """``(prompt_ids, prompt_mask, completion, cmask)`` of the completions ``idx``."""
        return self.prompt_ids[idx], self.prompt_mask[idx], self.completion[idx], self.cmask[idx]
