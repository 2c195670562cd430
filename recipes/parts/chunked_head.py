"""Next-token log-probabilities, entropies and cross-entropy of a causal LM, a chunk of positions at a time.

A causal LM's logits are ``head(hidden)`` with ``hidden`` the decoder's last hidden state ([.., H]) and ``head``
the output projection to the vocabulary ([.., V]). At a 128k-152k vocabulary the fp32 logits of every position
dominate memory (64 completions x 256 tokens x 151,936 x 4 bytes ~ 10 GB per copy). Here the hidden states are
computed once and only ``chunk_size`` positions at a time are projected, upcast and log-softmaxed; with gradients,
each chunk is checkpointed (non-reentrant), so backward recomputes one chunk's logits at a time as well. Peak
memory of this part is then ~``chunk_size x V x 4`` bytes times a small constant (logits, log-softmax, gradient),
whatever the number of positions.

This holds only for a model whose logits really are ``head(hidden)``. Some families transform them (Granite's
``logits_scaling``, Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale``, and whatever a later family
adds), so no list of config fields is trusted: :func:`chunked_head_matches` runs the model's own forward once on
a few tokens and compares; callers use the plain full-logits path (with a warning) when they differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.checkpoint import checkpoint

PROBE_TOKENS = 16  # tokens of the probe that checks a model's logits against head(hidden), once per model
_VERDICT = "_chunked_head_matches"  # attribute on the base model: copies (GRPO's reference) inherit the verdict


def split_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder (returning the last hidden state, final norm applied) and output head of a HF causal LM.

    A peft-wrapped model is unwrapped first (its adapters stay in place inside the decoder and head).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = getattr(base, "base_model", None)
    if config is None or head is None or decoder is None or decoder is base:
        raise ValueError(f"Chunked log-probs need a Hugging Face causal LM with a decoder and an output head; "
                         f"{type(base).__name__} has none")
    return decoder, head


def chunked_head_matches(model: nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether ``head(last_hidden_state)`` gives the model's own logits, so the chunked functions equal its loss.

    Checked once per model (the verdict is kept on it, and on copies of it) on the first ``PROBE_TOKENS`` tokens
    of the first row of ``input_ids``, with every module in eval mode for the probe (modes restored after), and no
    gradient. A model that transforms its logits (scaling, soft-capping, ...) fails the check; the caller then
    uses the model's full logits instead, and one warning says so.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    verdict = getattr(base, _VERDICT, None)
    if verdict is None:
        difference = _probe_difference(model, input_ids[:1, :PROBE_TOKENS])
        verdict = difference is None
        setattr(base, _VERDICT, verdict)
        if not verdict:
            rank_zero_warn(f"{type(base).__name__} transforms its logits (they differ from head(hidden state) by "
                           f"up to {difference:.3g} on a probe: a logit scaling or soft-capping), so chunked log-probs "
                           "and loss would be wrong; they are computed from the model's full logits instead (more "
                           "memory). Set loss_chunk_size / logprob_chunk_size to null to silence this.")
    return verdict


@torch.no_grad()
def _probe_difference(model: nn.Module, ids: torch.Tensor) -> float | None:
    """The largest difference between the model's own logits and ``head(hidden)`` on ``ids``, or ``None`` when they
    agree to a few rounding steps of the logits' precision (both paths run the same head on the same states)."""
    _, head = split_lm(model)
    modes = {module: module.training for module in model.modules()}
    model.eval()  # no dropout: both passes must see the same states
    try:
        out = model(input_ids=ids, use_cache=False)
        own = out.logits if hasattr(out, "logits") else out[0]
        ours = head(last_hidden_state(model, input_ids=ids))
    finally:
        for module, training in modes.items():
            module.training = training
    tolerance = 4 * torch.finfo(own.dtype).eps * own.float().abs().clamp(min=1.0)
    difference = (own.float() - ours.float()).abs()
    return None if bool((difference <= tolerance).all()) else float(difference.max())


def last_hidden_state(model: nn.Module, **inputs) -> torch.Tensor:
    """The decoder's output [B, S, H] for ``inputs`` (``input_ids``, ``attention_mask``, ...), without logits."""
    decoder, _ = split_lm(model)
    out = decoder(**inputs, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _chunk_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                    entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    logp_all = torch.log_softmax(head(hidden).float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return logp, None
    with torch.no_grad():  # a statistic: no graph, and checkpoint's recomputation stops before it
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def _needs_graph(hidden: torch.Tensor, head: nn.Module) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))


def chunked_token_logprobs(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, temperature: float = 1.0,
                           chunk_size: int = 512, entropy: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(head(h_t) / temperature)[target_t] for every position, ``chunk_size`` positions at a time.

    ``hidden`` [N, T, H] is aligned with ``targets`` [N, T] (the state that predicts each target). Returns the
    log-probs [N, T] (differentiable) and, with ``entropy``, the entropy of each position's distribution [N, T]
    (detached: a statistic), both in fp32. Equal to ``recipes.grpo.loss.token_logprobs(head(hidden), targets)``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not align")
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    graph = _needs_graph(hidden, head)
    logps, ents = [], []
    for start in range(0, flat_t.numel(), chunk_size):
        h, t = flat_h[start:start + chunk_size], flat_t[start:start + chunk_size]
        if graph:
            logp, ent = checkpoint(_chunk_logprobs, head, h, t, temperature, entropy, use_reentrant=False)
        else:
            logp, ent = _chunk_logprobs(head, h, t, temperature, entropy)
        logps.append(logp)
        ents.append(ent)
    logp = torch.cat(logps).view(targets.shape)
    return logp, torch.cat(ents).view(targets.shape) if entropy else None


def _chunk_nll_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int = 1024,
                          ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` against ``labels`` over the positions whose label is not ignored.

    ``hidden`` [B, S, H] is aligned with ``labels`` [B, S] (already shifted: the state that predicts each label).
    Only labelled positions are projected, ``chunk_size`` at a time; equal to the Hugging Face causal-LM loss.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    keep = (labels != ignore_index).reshape(-1)
    flat_h = hidden.reshape(-1, hidden.shape[-1])[keep]
    flat_l = labels.reshape(-1)[keep]
    if flat_l.numel() == 0:
        return hidden.sum() * 0.0  # no labelled token: a zero loss that still belongs to the graph
    graph = _needs_graph(hidden, head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_l.numel(), chunk_size):
        h, t = flat_h[start:start + chunk_size], flat_l[start:start + chunk_size]
        total = total + (checkpoint(_chunk_nll_sum, head, h, t, use_reentrant=False) if graph
                         else _chunk_nll_sum(head, h, t))
    return total / flat_l.numel()
