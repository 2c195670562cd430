"""Building blocks the callbacks use that are not callbacks themselves.

- ``blocks``: ``find_blocks`` / ``ModelParts``, the one helper that locates a model's repeated blocks.
- ``compiled_blocks``: ``compile_blocks``, torch.compile of each block in place (the recipes' ``compile`` setting),
  so that block switching and layer drop do not recompile.
- ``block_switching``: ``BlockSwitching``, the mechanism LISA, OwLore and BAdam share (freeze and unfreeze blocks,
  release optimizer state, agree across ranks, save state); they are its policies (which blocks next).
- ``layer_stats``: per-block statistics of the residual stream, and ``measuring``, the context every measurement
  on training batches runs in.
- ``modes``: which trainable modules are in eval mode, and ``modes_kept`` / ``eval_mode`` / ``dropout_off``,
  contexts that change train/eval modes for a while and give every module its own mode back.
- ``measured_weights``: per-block sampling weights measured on the first training batches (LISA importance,
  OwLore outlier scores).
- ``heatmap``: ``draw_heatmap``, the blocks x time picture of one per-block metric.
- ``block_panel``: a per-block metric on the dashboard: scalars per block for CSV, one heatmap panel for W&B.
- ``image_log``: ``log_image``, one image to every logger that shows images (W&B, TensorBoard).
- ``galore``: ``GaLoreAdamW``, the low-rank-gradient optimizer OwLore trains with.
- ``unused_parameters``: ``allow_unused_parameters``, the DDP/FSDP setting a callback that freezes or skips blocks
  needs (set in its ``setup``, before the model is wrapped).
- ``policy_tokens``: ``PolicyTokens``, the per-token batch GRPO hands to registered loss terms (LLDS).

``recipes`` imports these downward; nothing here imports ``recipes``.
"""

from callbacks.core.blocks import ModelParts, find_blocks
from callbacks.core.galore import GaLoreAdamW
from callbacks.core.policy_tokens import PolicyTokens

__all__ = ["GaLoreAdamW", "ModelParts", "PolicyTokens", "find_blocks"]
