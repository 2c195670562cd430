"""GaLore: low-rank gradient projection (Zhao et al. 2024, arXiv 2403.03507) in an AdamW optimizer.

For a projected m x n weight, every ``update_proj_gap`` of its own steps the projector is refreshed from the
SVD of the float32 gradient G = U S Vh:

* m >= n: right projection, P = Vh[:r] (r x n); R = G P^T (m x r); back: scale * R' P.
* m <  n: left projection,  P = U[:, :r] (m x r); R = P^T G (r x n); back: scale * P R'.

Adam's moments live in the r-dimensional space, so a projected weight costs 2 m r + r n (or 2 r n + m r)
optimizer floats instead of 2 m n. The update follows GaLore's AdamW: ``p -= step_size * scale * back(m / (sqrt(v)
+ eps))`` with ``step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)``; moments are kept across projector refreshes
(as in the GaLore code). Weight decay is decoupled (``p *= 1 - lr * wd``, as torch's AdamW). Every parameter that is
not projected gets plain AdamW.

Which weights are projected: :meth:`GaLoreAdamW.set_projected` (the :class:`~callbacks.owlore.OwLore` callback
calls it with the 2-D weights of the blocks), or ``project_all_matrices=True`` for every 2-D parameter. The
projector is an ordinary tensor in ``optimizer.state[p]["projector"]``, so it is checkpointed with the optimizer.
Use from a YAML as ``optimizer: {class_path: callbacks.core.galore.GaLoreAdamW, init_args: {lr: ..., rank: 256}}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def projection_matrix(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """GaLore projector of an m x n gradient: ``Vh[:r]`` (r x n) if m >= n, else ``U[:, :r]`` (m x r)."""
    m, n = grad.shape
    r = min(rank, m, n)
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return (vh[:r] if m >= n else u[:, :r]).contiguous()


def project(grad: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """Low-rank gradient: ``G P^T`` (right, m >= n) or ``P^T G`` (left)."""
    if grad.shape[0] >= grad.shape[1]:
        return grad.float() @ projector.T
    return projector.T @ grad.float()


def project_back(low_rank: torch.Tensor, projector: torch.Tensor, shape: torch.Size, scale: float) -> torch.Tensor:
    """Full-size update from a low-rank one: ``scale * R P`` (right) or ``scale * P R`` (left)."""
    full = low_rank @ projector if shape[0] >= shape[1] else projector @ low_rank
    return full * scale


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore low-rank projection for the selected 2-D weights.

    Args:
        params: parameters or parameter groups (named groups such as ``decay`` / ``no_decay`` are kept).
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW`.
        rank: projection rank r, clamped to min(m, n) per matrix (OwLore's scripts: 256; GaLore's default: 128).
        update_proj_gap: steps between projector refreshes (OwLore's scripts: 100; GaLore's default: 200).
        scale: multiplier of the projected-back update (OwLore's scripts: 1.0; GaLore's default: 0.25).
        project_all_matrices: project every 2-D parameter without waiting for :meth:`set_projected`.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 256,
        update_proj_gap: int = 100,
        scale: float = 1.0,
        project_all_matrices: bool = False,
    ) -> None:
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        if update_proj_gap < 1:
            raise ValueError(f"update_proj_gap must be at least 1, got {update_proj_gap}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale)
        super().__init__(params, defaults)
        self.projected: set[int] = set()
        if project_all_matrices:
            self.set_projected(p for g in self.param_groups for p in g["params"])

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as torch does, but keep each state tensor's own dtype (torch casts them to the parameter's): a
        projected weight's projector and moments are float32 also when the weight is bf16 (``bf16-true``), and a
        resumed run continues with them exactly as they were saved."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for param_id, param in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(param_id, {}).items():
                if isinstance(value, torch.Tensor) and key != "step" and value.is_floating_point():
                    self.state[param][key] = value.to(device=param.device, copy=True)

    def set_projected(self, params: Iterable[nn.Parameter]) -> None:
        """Project exactly the 2-D parameters among ``params`` (others get plain AdamW)."""
        self.projected = {id(p) for p in params if p.ndim == 2}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                state = self.state[p]
                projected = id(p) in self.projected
                grad = p.grad
                if projected:
                    if "step" not in state or int(state["step"]) % group["update_proj_gap"] == 0:
                        state["projector"] = projection_matrix(grad, group["rank"])
                    grad = project(grad, state["projector"])
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
                if projected:
                    update = project_back(update, state["projector"], p.shape, group["scale"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-step_size)
        return loss
