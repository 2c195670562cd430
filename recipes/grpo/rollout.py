"""A GRPO rollout batch: its completions' rewards, its named structure and its statistics (sampling the completions:
``recipes.grpo.engines``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from datamodules.rewards import RewardFn, compute_rewards


@dataclass
class Rollout:
    """One rollout batch, prompt-major (the G completions of a prompt are consecutive); N = prompts x G rows.

    ``loss_mask`` is the completion mask with completions whose reward failed zeroed; ``old_logp`` / ``ref_logp``
    are the per-token log-probs of the rollout policy and the frozen reference, filled in by
    ``GRPOModule.rollout_logprobs`` (their one owner).
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


def score_completions(verifier: RewardFn, reward_funcs: list | None, prompts: list[str], texts: list[str],
                      columns: dict[str, list], drop_bad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rewards, correct, valid)`` of the completions ``texts``: the sum of ``reward_funcs`` (the verifier's reward
    when ``None``), whether the verifier accepts each one, and which ones every reward function scored (with
    ``drop_bad``; otherwise a failing reward function stops the run)."""
    verifier_rewards, valid = compute_rewards(verifier, prompts, texts, columns, drop_bad)
    if reward_funcs is None:
        return verifier_rewards, verifier_rewards > 0.5, valid
    total = torch.zeros(len(texts))
    for fn in reward_funcs:
        r, ok = compute_rewards(fn, prompts, texts, columns, drop_bad)
        total, valid = total + r, valid & ok
    return total, verifier_rewards > 0.5, valid


def rollout_metrics(rollout: Rollout) -> dict[str, torch.Tensor]:
    """The ``grpo/*`` statistics of a rollout batch over its valid completions; ``grpo/logp_correct`` /
    ``grpo/logp_incorrect``: mean per-token log-likelihood under the rollout policy (needs ``old_logp``)."""
    rewards, correct, ok = rollout.rewards, rollout.correct, rollout.valid
    cmf = rollout.cmask.float()
    seq_logp = (rollout.old_logp * cmf).sum(1) / cmf.sum(1).clamp(min=1)
    metrics = {
        "grpo/reward_mean": rewards[ok].mean() if ok.any() else torch.zeros(()),
        "grpo/reward_std": rewards[ok].std() if ok.sum() > 1 else torch.zeros(()),
        "grpo/accuracy": correct[ok].float().mean() if ok.any() else torch.zeros(()),
        "grpo/completion_length": cmf.sum(1).mean(),
        "grpo/dropped": (~ok).float().sum(),
    }
    for name, sel in (("grpo/logp_correct", correct & ok), ("grpo/logp_incorrect", ~correct & ok)):
        if sel.any():
            metrics[name] = seq_logp[sel].mean()
    return {k: v.float() for k, v in metrics.items()}


def mini_batch_indices(n: int, mu: int, num_mini_batches: int, seed: int) -> Iterator[torch.Tensor]:
    """Completion indices of each optimizer step on a rollout batch of ``n``: ``mu`` passes (shuffled from
    ``seed`` when there are several mini-batches) of exactly ``num_mini_batches`` mini-batches, whose sizes differ
    by at most one, so a rollout batch always makes ``mu * num_mini_batches`` optimizer steps."""
    if n < num_mini_batches:
        raise ValueError(f"a rollout batch of {n} completions cannot make num_mini_batches={num_mini_batches} "
                         "mini-batches; lower model.num_mini_batches or raise data.batch_size * num_generations")
    generator = torch.Generator().manual_seed(seed)
    for _ in range(mu):
        order = torch.randperm(n, generator=generator) if num_mini_batches > 1 else torch.arange(n)
        yield from order.tensor_split(num_mini_batches)
