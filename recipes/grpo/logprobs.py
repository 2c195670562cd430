"""Per-token log-probabilities (and entropies) of sampled completions under a causal LM: GRPO's ratio, KL and
entropy are made of these.

The input is the prompt (left-padded) followed by the completion; position ids count only real tokens, so a
left-padded prompt gives the same log-probs as an unpadded one. Only the completion positions are projected through
the output head: with ``chunk_size`` a chunk of positions at a time (``chunked_head``), else all at once.
"""

from __future__ import annotations

import torch

from recipes.grpo.loss import token_entropy, token_logprobs
from recipes.parts.chunked_head import (
    PROBE_TOKENS,
    chunked_head_matches,
    chunked_token_logprobs,
    last_hidden_state,
    split_lm,
)


def _inputs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion: torch.Tensor,
            cmask: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = torch.cat([prompt_mask, cmask], 1)
    return {"input_ids": torch.cat([prompt_ids, completion], 1), "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}


def completion_logits(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      completion: torch.Tensor, cmask: torch.Tensor) -> torch.Tensor:
    """Logits predicting each completion token [N, T, V] (only completion positions are projected)."""
    t = completion.shape[1]
    logits = model(**_inputs(prompt_ids, prompt_mask, completion, cmask), use_cache=False, logits_to_keep=t + 1).logits
    return logits[:, :-1]


def completion_logprobs(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        completion: torch.Tensor, cmask: torch.Tensor, temperature: float = 1.0,
                        chunk_size: int | None = 512, entropy: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(completion token | prefix) [N, T] at ``temperature``, and with ``entropy`` the (detached) entropies.

    With ``chunk_size`` the decoder runs once and the head projects that many positions at a time, so no fp32
    full-vocabulary logits exist for more than one chunk; ``None`` projects every position at once, as does a
    model whose logits are not ``head(hidden)`` (checked once per model, with a warning).
    """
    inputs = _inputs(prompt_ids, prompt_mask, completion, cmask)
    if chunk_size is None or not chunked_head_matches(model, inputs["input_ids"][:, -PROBE_TOKENS:]):
        logits = completion_logits(model, prompt_ids, prompt_mask, completion, cmask)
        ent = None
        if entropy:
            with torch.no_grad():
                ent = token_entropy(logits, temperature)
        return token_logprobs(logits, completion, temperature), ent
    hidden = last_hidden_state(model, **inputs)
    t = completion.shape[1]
    return chunked_token_logprobs(hidden[:, -t - 1:-1], split_lm(model)[1], completion, temperature, chunk_size,
                                  entropy)
