"""The math of GRPO (DeepSeekMath, arXiv 2402.03300) as pure tensor functions.

The per-token batch that registered loss terms (e.g. ``callbacks.LLDS``) receive is ``callbacks.core.PolicyTokens``.

Shapes: ``N`` completions, ``T`` completion tokens (right-padded); ``mask`` is 1 on a completion's real tokens.
"""

from __future__ import annotations

import torch

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("sequence_mean", "token_mean", "max_length")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", valid: torch.Tensor | None = None,
                     eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(group)) / (std + eps), with the std of the group, of the batch, or none (Dr. GRPO).

    ``rewards`` holds ``group_size`` consecutive completions per prompt. Means and (unbiased) stds are over
    the ``valid`` completions only; invalid ones (dropped rewards) get advantage 0.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    r = rewards.float().view(-1, group_size)
    v = valid.view(-1, group_size).float()
    count = v.sum(1, keepdim=True)
    mean = (r * v).sum(1, keepdim=True) / count.clamp(min=1)
    centred = (r - mean) * v
    if scale == "group":
        std = ((centred**2).sum(1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    elif scale == "batch":
        flat = r.flatten()[valid.flatten()]
        std = flat.std() if flat.numel() > 1 else torch.zeros(())
    else:
        return centred.flatten()
    return (centred / (std + eps)).flatten()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(target_t | prefix) for every position: ``logits`` [N, T, V] already aligned with ``targets`` [N, T].

    Logits are divided by the sampling temperature, so the ratio compares the distribution that was sampled from.
    The log-softmax reduces over the contiguous last dimension: ``cross_entropy`` on the transposed [N, V, T] view
    sums 152k exponentials along a strided axis and lands ~2e-5 from a float64 reference, ten times further.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the next-token distribution at every position, [N, T]."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float = 0.2,
                      eps_high: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A), rho = exp(logp - old_logp).

    Returns the loss [N, T] and a bool tensor marking tokens where the clipped term was the active one.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    return -torch.min(unclipped, clipped), clipped < unclipped


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 (always >= 0)."""
    diff = ref_logp - logp
    return torch.exp(diff) - diff - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "sequence_mean",
              max_length: int | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    ``sequence_mean``: mean over each completion's tokens, then over completions (the GRPO paper).
    ``token_mean``: sum over all tokens / number of tokens (DAPO, within a mini-batch).
    ``max_length``: sum over all tokens / (completions * max_length) (Dr. GRPO).

    Completions that are not ``valid`` (dropped rewards) count nowhere, neither in the sums nor in the number of
    completions; ``valid=None`` takes every completion with at least one token in ``mask`` (the GRPO module zeroes
    the mask of dropped completions), so dropping 2 of 4 completions does not halve the loss.
    """
    valid = mask.bool().any(1) if valid is None else valid.bool()
    mask = mask.to(per_token.dtype) * valid.unsqueeze(1).to(per_token.dtype)
    completions = valid.sum().clamp(min=1)
    if mode == "sequence_mean":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / completions
    if mode == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if mode == "max_length":
        if max_length is None:
            raise ValueError("aggregation 'max_length' needs max_length (the max_new_tokens budget)")
        return (per_token * mask).sum() / (completions * max_length)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on every completion token up to and including the first EOS, 0 after it."""
    is_eos = completion_ids == eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~after_eos).long()


def grpo_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   valid: torch.Tensor, ref_logp: torch.Tensor | None, entropy: torch.Tensor, *, eps_low: float,
                   eps_high: float, kl_coef: float, aggregation: str, max_new_tokens: int
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's objective on one mini-batch (arXiv 2402.03300, Eq. 3): the clipped surrogate plus ``kl_coef`` times
    the k3 KL to the reference, aggregated over tokens; returns it and its statistics (``loss/grpo``, ``grpo/kl``,
    the clip fraction, the mean ratio and the mean entropy over the masked tokens)."""
    per_token, clipped = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    stats = {}
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + kl_coef * kl
        stats["grpo/kl"] = aggregate(kl.detach(), mask, aggregation, max_new_tokens, valid)
    loss = aggregate(per_token, mask, aggregation, max_new_tokens, valid)
    stats["loss/grpo"] = loss.detach()
    with torch.no_grad():
        mf = mask.float()
        tokens = mf.sum().clamp(min=1)
        stats["grpo/clip_fraction"] = (clipped.float() * mf).sum() / tokens
        stats["grpo/ratio"] = (torch.exp(logp - old_logp) * mf).sum() / tokens
        stats["grpo/entropy"] = (entropy * mf).sum() / tokens
    return loss, stats
