"""GRPO's optional supervised warm-up: response-token cross-entropy on the data module's ``sft`` split before the
first rollout, so that a base model starts out writing answers the verifier can read."""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from callbacks.run.finite_loss import NonFiniteLossError


def sft_warmup(model: torch.nn.Module, loader: DataLoader, steps: int, lr: float, device: torch.device,
               before_step: Callable[[], None] | None = None) -> list[float]:
    """``steps`` AdamW steps (fixed ``lr``, gradient norm clipped to 1) over ``loader``, cycling; returns the losses.
    The model trains in the modes it has (the recipes build it in train mode). ``before_step`` runs before every
    step and may raise to stop the warm-up there (a preemption signal: :func:`stop_if_preempted`).

    Stops with ``NonFiniteLossError`` at the first non-finite loss, naming the step.
    """
    if len(loader) == 0:
        raise ValueError(f"the SFT warm-up data gives no batch ({len(loader.dataset)} samples, batch size "
                         f"{loader.batch_size}, incomplete batches dropped); lower data.sft_batch_size or set "
                         "model.sft_steps: 0")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98))
    losses: list[float] = []
    while len(losses) < steps:
        for batch in loader:
            if before_step is not None:
                before_step()
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False).loss
            step = len(losses) + 1
            if not torch.isfinite(loss):
                last = f"{losses[-1]:.6g}" if losses else "none yet"
                raise NonFiniteLossError(
                    f"SFT warm-up loss is {loss.item()} at warm-up step {step}/{steps} (last finite loss {last}); "
                    "no checkpoint was written. Lower model.sft_lr or check the sft data")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % 50 == 0 or step == steps:
                rank_zero_info(f"SFT warm-up step {step}/{steps}: loss {losses[-1]:.3f}")
            if step >= steps:
                break
    return losses
