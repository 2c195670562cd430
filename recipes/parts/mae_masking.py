"""MAE helpers: patchify/unpatchify, per-sample random masking and fixed 2-D sin-cos position embeddings.

Follows the MAE reference (He et al. 2021, ``models_mae.py``) as used by arXiv 2210.12843: masking draws
``noise = rand(N, L)``, keeps the ``L * (1 - ratio)`` patches with the smallest noise, and returns
``ids_restore = argsort(ids_shuffle)`` so the decoder can put mask tokens back in place (mask 1 = removed).
"""

from __future__ import annotations

import numpy as np
import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(N, C, H, W)`` images to ``(N, L, p*p*C)`` patches in row-major patch order, pixels as ``(p, p, C)``."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(N, L, p*p*C)`` back to ``(N, C, H, W)`` for a ``grid = (H/p, W/p)``."""
    n = patches.shape[0]
    gh, gw = grid
    p = patch_size
    x = patches.reshape(n, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, gh * p, gw * p)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image: ``int(L * (1 - mask_ratio))`` as in the MAE code (at least one)."""
    return max(1, int(num_patches * (1 - mask_ratio)))


def check_mask_ratio(mask_ratio: float, num_patches: int) -> None:
    """``ValueError`` unless ``mask_ratio`` removes at least one of ``num_patches`` patches and keeps at least one
    (the loss is a mean over the removed patches: with none removed it is 0 / 0)."""
    keep = num_kept(num_patches, mask_ratio) if 0 <= mask_ratio < 1 else 0
    if not 0 < keep < num_patches:
        raise ValueError(f"mask_ratio={mask_ratio} removes {num_patches - keep} of the {num_patches} patches per "
                         "image; expected a ratio that removes at least one patch and keeps at least one (paper 0.9)")


def random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise.

    Args:
        x: ``(N, L, D)`` patch tokens (position embeddings already added).
        mask_ratio: share of patches removed.
        generator: optional CPU generator for the noise (reproducible masks under DDP: same seed, different data).
        noise: optional ``(N, L)`` noise to use instead of drawing it (tests).

    Returns:
        ``x_visible (N, K, D)``, ``mask (N, L)`` with 1 = removed in the original order, ``ids_restore (N, L)``.
    """
    n, length, dim = x.shape
    keep = num_kept(length, mask_ratio)
    if noise is None:
        if generator is None:
            noise = torch.rand(n, length, device=x.device)
        else:
            noise = torch.rand(n, length, generator=generator, device=generator.device).to(x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False,
               eps: float = 1e-6) -> torch.Tensor:
    """MAE loss: per-patch MSE averaged over the masked patches only (``mask`` 1 = removed).

    ``norm_pix`` normalizes every target patch by its own mean and variance first (MAE's ``norm_pix_loss``).
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], num_prefix: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings ``(num_prefix + gh*gw, dim)``; prefix (class) rows are zero.

    Half of ``dim`` encodes the row and half the column, each as ``[sin(pos * omega), cos(pos * omega)]``
    with ``omega = 1 / 10000^(2i/(dim/2))`` (MAE ``get_2d_sincos_pos_embed``).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need an embedding width divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # MAE's meshgrid puts w first, so the first half of the channels encodes the column (w) position.
    emb = np.concatenate([one_axis(cols), one_axis(rows)], axis=1)
    if num_prefix:
        emb = np.concatenate([np.zeros((num_prefix, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()
