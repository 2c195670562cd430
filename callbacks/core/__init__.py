"""Building blocks the callbacks use that are not callbacks themselves.

- ``blocks``: ``find_blocks`` / ``ModelParts``, the one helper that locates a model's repeated blocks.
- ``galore``: ``GaLoreAdamW``, the low-rank-gradient optimizer OwLore trains with.
- ``policy_tokens``: ``PolicyTokens``, the per-token batch GRPO hands to registered loss terms (LLDS).

``recipes`` imports these downward; nothing here imports ``recipes``.
"""

from callbacks.core.blocks import ModelParts, find_blocks
from callbacks.core.galore import GaLoreAdamW
from callbacks.core.policy_tokens import PolicyTokens

__all__ = ["GaLoreAdamW", "ModelParts", "PolicyTokens", "find_blocks"]
