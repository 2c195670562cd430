"""LLDS: Lazy Likelihood-Displacement Stabilization for GRPO (Deng et al., arXiv 2512.04220).

The likelihood of responses, correct ones included, tends to fall during GRPO ("lazy likelihood displacement"),
which lowers confidence, inflates gradients and collapses training. LLDS penalizes, on responses with A >= 0
only, every token whose log-likelihood fell below the rollout (old) policy's:

    delta_t = logp_old_t - logp_t,   L_LLDS = sum_{i: A_i >= 0} sum_t g_it * w_t * max(0, delta_t) / Z,
    loss = L_GRPO + lambda * L_LLDS

with the gate g = 1 (``token``), 1[sum_t delta_t > 0] over the whole response (``response``) or over each action
segment (``action``, the paper's default for multi-turn tool use; equals ``response`` for single-turn).
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from callbacks.core.policy_tokens import PolicyTokens

GATES = ("token", "response", "action")
NORMALIZATIONS = ("regularized_tokens", "all_tokens")


def segment_ids(action_mask: torch.Tensor) -> torch.Tensor:
    """Number each contiguous run of 1s in ``action_mask`` [N, T] (1, 2, ... per row); 0 outside actions."""
    m = action_mask.long()
    starts = m * (1 - torch.nn.functional.pad(m, (1, 0))[:, :-1])
    return starts.cumsum(1) * m


def llds_penalty(tokens: PolicyTokens, gate: str = "response", beta: float | None = None,
                 normalization: str = "regularized_tokens") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The LLDS penalty of one mini-batch and its diagnostics (``gated_fraction``, ``preserved_fraction``).

    ``normalization``: ``regularized_tokens`` divides by the number of tokens of the responses with A >= 0 (the
    paper's "averaged over the regularized responses' tokens"; the default); ``all_tokens`` divides by all
    completion tokens of the mini-batch, as a masked mean over the response mask (the form a trainer's
    ``agg_loss`` computes, which shrinks the penalty when few responses are preserved).
    ``beta`` multiplies the penalty of answer-span tokens (``tokens.answer_mask``); ``None`` weights all alike.
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    mask = tokens.mask.float()
    preserved = tokens.advantages >= 0
    if tokens.valid is not None:
        preserved = preserved & tokens.valid
    delta = (tokens.old_logp - tokens.logp) * mask
    if gate == "token":
        g = torch.ones_like(delta)
        gated = ((delta > 0).float() * mask)[preserved].sum() / mask[preserved].sum().clamp(min=1)
    elif gate == "response":
        on = (delta.sum(1) > 0).float()
        g = on.unsqueeze(1).expand_as(delta)
        gated = on[preserved].mean() if preserved.any() else torch.zeros(())
    else:
        seg = segment_ids(tokens.action_mask * tokens.mask)
        n_seg = int(seg.max()) if seg.numel() else 0
        onehot = torch.nn.functional.one_hot(seg, n_seg + 1)[..., 1:].float()  # [N, T, S]
        seg_sum = torch.einsum("nt,nts->ns", delta, onehot)
        exists = onehot.sum(1) > 0
        on = (seg_sum > 0) & exists
        g = torch.einsum("ns,nts->nt", on.float(), onehot)
        count = exists[preserved].sum()
        gated = on[preserved].sum() / count.clamp(min=1)
    weight = torch.ones_like(delta)
    if beta is not None:
        if tokens.answer_mask is None:
            raise ValueError("LLDS beta needs answer-span masks; the module did not provide tokens.answer_mask")
        weight = torch.where(tokens.answer_mask.bool(), torch.full_like(weight, beta), weight)
    keep = preserved.float().unsqueeze(1) * mask
    total = (g * weight * torch.clamp(delta, min=0) * keep).sum()
    denom = keep.sum() if normalization == "regularized_tokens" else mask.sum()
    penalty = total / denom.clamp(min=1)
    return penalty, {"gated_fraction": gated.detach().float(), "preserved_fraction": preserved.float().mean()}


class LLDS(Callback):
    """Adds ``coef * L_LLDS`` to a ``recipes.GRPOModule``'s loss (registered as the loss term ``llds``).

    Args:
        coef: lambda, the penalty's weight (paper: 0.2; 0.3 for one of their models).
        gate: ``response`` (default; sum of delta over the response > 0), ``token`` (no gate) or ``action`` (sum
            over each action segment of the module's ``action_mask`` > 0; one segment = the whole response for
            single-turn completions).
        beta: weight of the answer span's tokens (the paper's answer-span variant); ``None`` = all tokens alike.
        normalization: ``regularized_tokens`` (default, the paper: mean over the tokens of responses with A >= 0)
            or ``all_tokens`` (mean over every completion token of the mini-batch).

    Logs ``llds/penalty`` (before ``coef``), ``llds/gated_fraction`` and ``loss/llds`` (after ``coef``). With
    ``mu == 1`` and one mini-batch per rollout, old and current policy coincide and LLDS is exactly zero; it
    warns once in that case.
    """

    def __init__(self, coef: float = 0.2, gate: str = "response", beta: float | None = None,
                 normalization: str = "regularized_tokens") -> None:
        if coef < 0:
            raise ValueError(f"LLDS coef must be >= 0, got {coef}")
        if gate not in GATES:
            raise ValueError(f"LLDS gate must be one of {GATES}, got {gate!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"LLDS normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if beta is not None and beta < 0:
            raise ValueError(f"LLDS beta must be >= 0 or None, got {beta}")
        self.coef, self.gate, self.beta, self.normalization = coef, gate, beta, normalization
        self._warned = False

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "register_loss_term"):
            raise TypeError(f"LLDS needs a module with register_loss_term (e.g. recipes.GRPOModule), got "
                            f"{type(pl_module).__name__}")
        pl_module.register_loss_term("llds", self.loss_term, needs_answer_mask=self.beta is not None)
        if pl_module.updates_per_rollout == 1 and not self._warned:
            self._warned = True
            rank_zero_warn("LLDS is exactly zero in this run: with mu=1 and a single mini-batch per rollout batch "
                           "the old (rollout) policy equals the current policy, so delta = logp_old - logp = 0. "
                           "Set mu > 1 or num_mini_batches > 1 for LLDS to act.")

    def loss_term(self, tokens: PolicyTokens) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        penalty, stats = llds_penalty(tokens, self.gate, self.beta, self.normalization)
        return self.coef * penalty, {"llds/penalty": penalty.detach(), "llds/gated_fraction": stats["gated_fraction"]}
