"""GRPO (group relative policy optimization, arXiv 2402.03300) with verifiable rewards: one concept, one package.

- ``module``: ``GRPOModule``, the LightningModule (rollouts, the update loop, validation, the start from an SFT
  checkpoint). ``recipes.grpo.GRPOModule`` and ``recipes.GRPOModule`` name it.
- ``loss``: advantages, per-token log-probs, clipped surrogate, k3 KL and aggregation as tensor functions.
- ``engines``: sampling the completions of a rollout (``generate``, ``generate_static`` or ``paged``: continuous
  batching), one function ``sample_completions``.
- ``rollout``: one rollout batch: scoring its completions, the ``Rollout`` dataclass, its statistics, its
  mini-batches.
- ``reference``: the frozen KL reference (the run's initial policy, also after a resume).
- ``logprobs``: per-token log-probs and entropies of sampled completions under a causal LM.
- ``answer_span``: the final-answer tokens of sampled completions (for loss terms that ask for them).
- ``sft_start``: reading an SFT (``CausalLMModule``) checkpoint: its architecture, weights and data settings.
- ``sft_warmup``: the optional supervised warm-up on the data module's ``sft`` split.
- ``checks``: sequences beyond the model's positions, an SFT start the verifier cannot reward, all-zero rewards.

The per-token batch a registered loss term receives, ``callbacks.core.PolicyTokens``, lives in ``callbacks`` (the
LLDS callback uses it). ``GRPOModule`` is imported lazily, so the tensor functions load without Lightning.
"""

import importlib

__all__ = ["GRPOModule"]


def __getattr__(name: str):
    if name == "GRPOModule":
        return importlib.import_module("recipes.grpo.module").GRPOModule
    raise AttributeError(f"module 'recipes.grpo' has no attribute {name!r}")
