"""Masked-autoencoder pre-training of a timm ViT on chest X-rays (He et al. 2021; arXiv 2210.12843 recipe).

The encoder is any timm ``VisionTransformer`` built by name; only the visible 10% of patches go through its
blocks (that is where MAE's speed comes from). Position embeddings are fixed 2-D sin-cos (added before masking),
the decoder is light (512-d, depth 2 by default), and the loss is the MSE on masked patches only.
``export_encoder`` writes the encoder's ``state_dict`` so that ``timm.create_model(<same name>, num_classes=0,
checkpoint_path=...)`` loads it with strict key matching.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import timm
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from timm.models.vision_transformer import Block
from torch import nn
from typing_extensions import override

from callbacks.core.compiled_blocks import check_compile_setting, compile_blocks
from recipes.checkpoints import record_module_class
from recipes.parts.mae_masking import (
    check_mask_ratio,
    masked_mse,
    patchify,
    random_masking,
    sincos_pos_embed_2d,
    unpatchify,
)
from recipes.parts.optim import decay_groups, effective_batch_size, scaled_lr, warmup_cosine_scheduler


class MAEPretrainModule(L.LightningModule):
    """MAE pre-training: timm ViT encoder on visible patches, light Transformer decoder, masked-patch MSE.

    Args:
        model_name: timm ViT name (``vit_small_patch16_224``, ``vit_base_patch16_224``, ...), built without weights.
        img_size: input size in pixels (must match the data module's ``image_size``).
        in_chans: image channels (1 = grayscale X-rays, 3 = replicated gray as in the paper's code).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``patch_size``, ``depth``, ``embed_dim``,
            ``num_heads`` for a tiny test model); reuse the same ones when loading the exported encoder.
        decoder_dim / decoder_depth / decoder_heads: the light decoder (paper: 512-d, depth 2 for ViT-S, 8 for ViT-B).
        mask_ratio: share of patches removed (paper: 0.9).
        norm_pix_loss: normalize each target patch by its mean/variance (MAE option; off by default, as in the
            chest X-ray recipe of arXiv 2210.12843).
        base_lr: the learning rate per 256 images; the peak lr is ``base_lr * batch / 256`` (paper: 1.5e-4).
        lr: absolute peak learning rate, overriding the scaling rule when given.
        betas / weight_decay: AdamW settings (paper: (0.9, 0.95), 0.05; no decay on biases and norms).
        warmup_steps: linear warm-up in optimizer steps, then cosine to ``min_lr_ratio`` (paper: 40 of 800 epochs).
        export_encoder: write ``encoder.pth`` (+ ``encoder.json``) into the run directory when fit ends.
        compile: compile each encoder and decoder block with ``torch.compile`` (``callbacks.core.compiled_blocks``):
            same results as eager, no recompiles at LISA switches or layer-drop patterns; the exported encoder's
            keys are unchanged. Not a defining setting: a run may resume with it toggled.
    """

    # the settings that define the trained model: a resumed run must give the checkpoint's (recipes.resume)
    defining_settings: frozenset[str] = frozenset({"model_name", "img_size", "in_chans", "model_kwargs",
                                                   "decoder_dim", "decoder_depth", "decoder_heads"})

    def __init__(
        self,
        model_name: str = "vit_small_patch16_224",
        img_size: int = 224,
        in_chans: int = 1,
        model_kwargs: dict | None = None,
        decoder_dim: int = 512,
        decoder_depth: int = 2,
        decoder_heads: int = 16,
        mask_ratio: float = 0.9,
        norm_pix_loss: bool = False,
        base_lr: float = 1.5e-4,
        lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        export_encoder: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_compile_setting(compile)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), the share of patches removed (paper 0.9); "
                             f"got {mask_ratio}")
        if decoder_dim % decoder_heads:
            raise ValueError(f"decoder_dim={decoder_dim} must be divisible by decoder_heads={decoder_heads}")
        self.save_hyperparameters()
        self.encoder = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=img_size,
                                         in_chans=in_chans, **(model_kwargs or {}))
        enc = self.encoder
        if getattr(enc, "pos_embed", None) is None or getattr(enc, "dynamic_img_size", False):
            raise ValueError(f"{model_name} must be a timm VisionTransformer with absolute position embeddings "
                             "(no dynamic_img_size)")
        self.patch_size = enc.patch_embed.patch_size[0]
        self.grid = tuple(enc.patch_embed.grid_size)
        self.num_prefix = 0 if enc.no_embed_class else enc.num_prefix_tokens
        check_mask_ratio(mask_ratio, self.grid[0] * self.grid[1])
        # Fixed sin-cos position embeddings, as in MAE: the class-token row is zero and nothing is learned.
        with torch.no_grad():
            enc.pos_embed.copy_(sincos_pos_embed_2d(enc.embed_dim, self.grid, self.num_prefix).unsqueeze(0))
        enc.pos_embed.requires_grad_(False)

        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(enc.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed",
                             sincos_pos_embed_2d(decoder_dim, self.grid, enc.num_prefix_tokens).unsqueeze(0))
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
             for _ in range(decoder_depth)])
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * in_chans)
        self._init_decoder()
        if compile:
            compile_blocks(self.encoder)
            compile_blocks(self, blocks_path="decoder_blocks")

    def _init_decoder(self) -> None:
        """MAE's init for the new parts: xavier-uniform linears, zero biases, N(0, 0.02) mask token."""
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------------------ model
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float,
                        noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed patches, add position embeddings, drop the masked ones, run the blocks on what is left."""
        enc = self.encoder
        x = enc.patch_embed(imgs)
        pos = enc.pos_embed
        x = x + (pos if enc.no_embed_class else pos[:, enc.num_prefix_tokens:])
        x, mask, ids_restore = random_masking(x, mask_ratio, noise=noise)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (enc.cls_token, enc.reg_token) if t is not None]
        if prefix:
            prefix = torch.cat(prefix, dim=1)
            if not enc.no_embed_class:
                prefix = prefix + pos[:, :enc.num_prefix_tokens]
            x = torch.cat([prefix, x], dim=1)
        x = enc.norm_pre(enc.pos_drop(x))
        x = enc.blocks(x)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Mask tokens back in place, decoder blocks, per-patch pixel predictions ``(N, L, p*p*C)``."""
        npt = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)
        prefix, visible = x[:, :npt], x[:, npt:]
        n, length = ids_restore.shape
        tokens = torch.cat([visible, self.mask_token.expand(n, length - visible.shape[1], -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([prefix, tokens], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, npt:]

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, pred, mask)``: masked-patch MSE, predicted patches ``(N, L, p*p*C)`` and the mask (1 = removed)."""
        ratio = self.hparams.mask_ratio if mask_ratio is None else mask_ratio
        check_mask_ratio(ratio, self.grid[0] * self.grid[1])  # the loss is a mean over the removed patches
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise=noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = masked_mse(pred, patchify(imgs, self.patch_size), mask, norm_pix=self.hparams.norm_pix_loss)
        return loss, pred, mask

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, reconstruction)``: a ``(N, 1, H, W)`` map (1 = removed) and the visible patches plus predictions.

        With ``norm_pix_loss`` the predictions are de-normalized with each target patch's own statistics.
        """
        _, pred, mask = self(imgs)
        target = patchify(imgs, self.patch_size)
        if self.hparams.norm_pix_loss:
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        m = mask.unsqueeze(-1)
        recon = unpatchify(target * (1 - m) + pred * m, self.patch_size, self.grid, imgs.shape[1])
        mask_map = unpatchify(m.expand(-1, -1, self.patch_size ** 2), self.patch_size, self.grid, 1)
        return mask_map, recon

    # --------------------------------------------------------------------------------------------- training
    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, _, _ = self(batch["image"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0])

    @override
    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.lr if hp.lr is not None else scaled_lr(hp.base_lr, effective_batch_size(self.trainer))
        optimizer = torch.optim.AdamW(decay_groups(self, hp.weight_decay), lr=lr, betas=tuple(hp.betas))
        total = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer,
                "lr_scheduler": warmup_cosine_scheduler(optimizer, hp.warmup_steps, total, hp.min_lr_ratio)}

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        record_module_class(self, checkpoint)

    # ----------------------------------------------------------------------------------------------- export
    def encoder_create_kwargs(self) -> dict:
        """The ``timm.create_model`` arguments that rebuild the encoder the exported weights fit."""
        hp = self.hparams
        return {"img_size": hp.img_size, "in_chans": hp.in_chans, "num_classes": 0, **(hp.model_kwargs or {})}

    def export_encoder_to(self, path: str | Path) -> Path:
        """Save the encoder's ``state_dict`` (timm key names) to ``path`` and its build arguments next to it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.encoder.state_dict().items()}, path)
        meta = {"model_name": self.hparams.model_name, "create_kwargs": self.encoder_create_kwargs()}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @override
    def on_fit_end(self) -> None:
        if self.hparams.export_encoder:
            # trainer.log_dir is a collective call under DDP: every rank asks, rank 0 writes
            self._export_on_rank_zero(Path(self.trainer.log_dir or self.trainer.default_root_dir))

    @rank_zero_only
    def _export_on_rank_zero(self, run_dir: Path) -> None:
        path = self.export_encoder_to(run_dir / "encoder.pth")
        rank_zero_info(f"MAE encoder saved to {path} (load with timm.create_model({self.hparams.model_name!r}, "
                       f"checkpoint_path=..., **{self.encoder_create_kwargs()}))")
