"""GRPO's KL reference: a frozen copy of the policy as it was at the run's start, the same after a resume."""

from __future__ import annotations

import copy

import torch
from lightning.pytorch.utilities import rank_zero_info


def frozen_reference(model: torch.nn.Module, saved: dict[str, torch.Tensor] | None,
                     resumed_step: int | None) -> torch.nn.Module:
    """A frozen (eval, no-grad) copy of ``model`` holding ``saved`` (the reference a checkpoint holds) when given,
    else ``model``'s weights now. ``resumed_step``: the step a resumed run starts from (``None`` for a new run); a
    resumed checkpoint without a reference (saved with ``kl_coef: 0``) takes the resumed policy, and says so."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    if saved is not None:
        reference.load_state_dict(saved)
    elif resumed_step is not None:
        rank_zero_info("GRPO: the checkpoint holds no KL reference (it was saved with kl_coef 0); the reference is "
                       f"the resumed policy of step {resumed_step}")
    return reference
