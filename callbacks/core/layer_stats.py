"""Per-block statistics of the residual stream, measured with hooks on one forward pass.

For block l with input h_in and output h_out (per token t, hidden vectors):

    block influence        BI_l = 1 - mean_t cos(h_in[t], h_out[t])            (ShortGPT, arXiv 2403.03853, eq. 1)
    relative contribution  C_l  = mean_t ||h_out[t] - h_in[t]|| / ||h_in[t]||   (Csordas et al., arXiv 2505.13898)
    logit-lens KL          KL_l = mean_t KL(p_final[t] || softmax(head(norm(h_out[t]))))

Means run over the tokens that are not padding (``attention_mask``, or ``num_tokens`` per row of a packed batch),
or over all positions when there is none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import lightning as L
import torch
from torch import nn

from callbacks.core.modes import eval_mode

METRICS = ("block_influence", "contribution")


def forward_batch(module: nn.Module, batch) -> object:
    """Run ``module`` on one training batch: a dict of token tensors (``input_ids``, or GRPO's ``prompt_input_ids``)
    or images (``image``), an ``(inputs, ...)`` tuple, or a tensor.

    A module without its own ``forward`` (e.g. a LightningModule that only calls ``self.model``) runs its
    ``model`` attribute. A packed batch (``position_ids`` restarting per example, no mask; ``datamodules.packing``)
    runs with its position ids and no cache, so attention stays inside each example as in training.
    """
    if not _has_forward(module) and isinstance(getattr(module, "model", None), nn.Module):
        module = module.model
    if isinstance(batch, dict):
        for prefix in ("", "prompt_"):
            if f"{prefix}input_ids" in batch:
                mask = batch.get(f"{prefix}attention_mask")
                if "position_ids" in batch and not prefix:
                    return module(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
                return module(input_ids=batch[f"{prefix}input_ids"], attention_mask=mask)
        if "image" in batch:
            return module(batch["image"])
        raise ValueError(f"Cannot run a probe forward on a batch with keys {sorted(batch)}: expected 'input_ids', "
                         "'prompt_input_ids' or 'image'")
    return module(batch[0] if isinstance(batch, (list, tuple)) else batch)


def first_training_batches(trainer: L.Trainer, n: int) -> Iterator:
    """The first ``n`` training batches, on the model's device (for a measurement at fit start)."""
    for i, batch in enumerate(trainer.train_dataloader):
        if i == n:
            return
        yield trainer.strategy.batch_to_device(batch)


@contextmanager
def measuring(module: nn.Module, seed: int | None = None, cuda: bool = False) -> Iterator[None]:
    """The context every measurement on training batches runs in (LISA importance, OwLore calibration, layer
    diagnostics): eval mode, no grad and a forked random state, all put back after, so measuring does not change
    training (iterating the training loader does not shift the data order; dropout does not draw).

    Args:
        module: the model; every submodule gets its own train/eval mode back.
        seed: seed the CPU (and, with ``cuda``, the current CUDA device's) generator inside, so a model that
            draws at random in eval mode (MAE masking) draws alike at every measurement.
        cuda: fork (and seed) the current CUDA device's random state too.
    """
    devices = [torch.cuda.current_device()] if cuda else []
    with eval_mode(module), torch.random.fork_rng(devices=devices), torch.no_grad():
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            if devices:
                torch.cuda.manual_seed(seed)  # the current device only: the one fork_rng restores
        yield


def _has_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class (or a parent below the framework base classes) defines ``forward``."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith(("torch.", "lightning.", "pytorch_lightning.")):
            return False
        if "forward" in vars(cls):
            return True
    return False


def token_mask(batch) -> torch.Tensor | None:
    """The batch's ``attention_mask`` (or ``prompt_attention_mask``; 1 = real token), the leading ``num_tokens``
    positions of each row of a packed batch, or ``None``."""
    if not isinstance(batch, dict):
        return None
    if "num_tokens" in batch and "attention_mask" not in batch:
        width = batch["input_ids"].shape[1]
        return (torch.arange(width, device=batch["input_ids"].device) < batch["num_tokens"][:, None]).long()
    return batch["attention_mask"] if "attention_mask" in batch else batch.get("prompt_attention_mask")


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    raise ValueError("A block was called without a hidden-state tensor as its first argument or 'hidden_states'")


def _output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _token_mean(values: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Mean of per-token ``values`` (shape ``(B, T)`` or any) over the real tokens."""
    if mask is not None and mask.shape == values.shape:
        weights = mask.to(values.dtype)
        return float((values * weights).sum() / weights.sum().clamp_min(1))
    return float(values.mean())


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """BI = 1 - mean_t cos(h_in[t], h_out[t])."""
    cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
    return 1.0 - _token_mean(cos, mask)


def relative_contribution(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """C = mean_t ||h_out[t] - h_in[t]|| / ||h_in[t]||."""
    h_in, h_out = h_in.float(), h_out.float()
    ratio = (h_out - h_in).norm(dim=-1) / h_in.norm(dim=-1).clamp_min(1e-12)
    return _token_mean(ratio, mask)


@torch.no_grad()
def probe_blocks(blocks: Sequence[nn.Module], run: Callable[[], object], mask: torch.Tensor | None = None,
                 keep_outputs: bool = False) -> tuple[dict[str, list[float]], list[torch.Tensor]]:
    """Run ``run()`` once with hooks on ``blocks``; return ``{metric: [value per block]}`` and the block outputs.

    A block that does not run (e.g. skipped) gets NaN. Outputs are kept only with ``keep_outputs`` (logit lens).
    """
    found: dict[int, dict[str, float]] = {}
    outputs: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}

    def pre_hook(index: int):
        def hook(module, args, kwargs):
            inputs[index] = _first_tensor(args, kwargs).detach()
        return hook

    def post_hook(index: int):
        def hook(module, args, kwargs, output):
            h_in, h_out = inputs.pop(index), _output_tensor(output).detach()
            found[index] = {"block_influence": block_influence(h_in, h_out, mask),
                            "contribution": relative_contribution(h_in, h_out, mask)}
            if keep_outputs:
                outputs[index] = h_out
        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook(i), with_kwargs=True))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    nan = float("nan")
    stats = {m: [found.get(i, {}).get(m, nan) for i in range(len(blocks))] for m in METRICS}
    return stats, [outputs.get(i) for i in range(len(blocks))]


@torch.no_grad()
def logit_lens_kl(outputs: Sequence[torch.Tensor | None], lens: Callable[[torch.Tensor], torch.Tensor],
                  mask: torch.Tensor | None = None) -> list[float]:
    """KL(final || lens(h_l)) per block, the final distribution being the lens of the last block's output."""
    final = torch.log_softmax(lens(outputs[-1]).float(), dim=-1)
    result = []
    for h in outputs:
        if h is None:
            result.append(float("nan"))
            continue
        logq = torch.log_softmax(lens(h).float(), dim=-1)
        kl = (final.exp() * (final - logq)).sum(-1)
        result.append(_token_mean(kl, mask))
    return result


def parameter_groups(blocks: Sequence[nn.Module]) -> list[list[nn.Parameter]]:
    """The parameters of each block."""
    return [list(block.parameters()) for block in blocks]


def grad_norms(groups: Sequence[Sequence[nn.Parameter]]) -> list[float]:
    """L2 norm of the gradients of each parameter group (0 for a group without gradients)."""
    out = []
    for params in groups:
        sq = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
        out.append(float(torch.stack(sq).sum().sqrt()) if sq else 0.0)
    return out
