"""Multi-label ViT fine-tuning for chest X-rays (arXiv 2210.12843): layer-wise LR decay, drop path, macro AUROC."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from callbacks.core.compiled_blocks import check_compile_setting, compile_blocks
from recipes.checkpoints import record_module_class
from recipes.parts.auroc import MaskedMultilabelAUROC, log_auroc_table, write_auroc_table
from recipes.parts.optim import effective_batch_size, layer_decay_groups, scaled_lr, warmup_cosine_scheduler
from recipes.parts.vit_checkpoint import load_encoder_weights


class ViTClassifierModule(L.LightningModule):
    """A timm ViT with global average pooling and a multi-label head, trained with BCE-with-logits.

    Args:
        model_name: timm ViT name; built without downloaded weights.
        img_size / in_chans / model_kwargs: as for ``MAEPretrainModule`` (use the same ones as the checkpoint).
        init_from: ``None`` (scratch), an MAE ``encoder.pth`` export, an ``MAEPretrainModule`` Lightning checkpoint,
            or any timm checkpoint file of the same architecture (head, and ``norm`` under average pooling, skipped).
        label_names: the labels; ``None`` takes them from the data module's ``label_names``.
        global_pool: ``avg`` (paper) or ``token``.
        drop_path_rate: stochastic depth (paper: 0.2).
        layer_decay: layer-wise LR decay; block ``i`` trains at ``lr * decay**(L - i)`` (paper: 0.55).
        base_lr: learning rate per 256 images; peak lr ``base_lr * batch / 256`` (paper: 2.5e-4).
        lr: absolute peak learning rate overriding the scaling rule.
        betas / weight_decay: AdamW settings (MAE fine-tuning: (0.9, 0.999), 0.05).
        warmup_steps / min_lr_ratio: linear warm-up in optimizer steps, then cosine to ``min_lr_ratio`` of the peak.
        auroc_table: at test end, write ``test_auroc.csv`` and ``test_auroc.png`` into the run directory.
        compile: compile each ViT block with ``torch.compile`` (``callbacks.core.compiled_blocks``): same results
            as eager (drop path draws its own random numbers there), no recompiles at LISA switches or layer-drop
            patterns. Not a defining setting: a run may resume with it toggled.
    """

    # the settings that define the trained model: a resumed run must give the checkpoint's (recipes.resume)
    defining_settings: frozenset[str] = frozenset({"model_name", "img_size", "in_chans", "model_kwargs",
                                                   "global_pool", "label_names", "init_from"})

    def __init__(
        self,
        model_name: str = "vit_small_patch16_224",
        img_size: int = 224,
        in_chans: int = 1,
        model_kwargs: dict | None = None,
        init_from: str | None = None,
        label_names: list[str] | None = None,
        global_pool: str = "avg",
        drop_path_rate: float = 0.2,
        layer_decay: float = 0.55,
        base_lr: float = 2.5e-4,
        lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.0,
        auroc_table: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_compile_setting(compile)
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")
        self.save_hyperparameters()
        self.label_names: list[str] | None = list(label_names) if label_names else None
        self.model: torch.nn.Module | None = None
        self.metrics: dict[str, MaskedMultilabelAUROC] = {}
        self._init_loaded = False
        if self.label_names is not None:
            self.configure_model()

    # ------------------------------------------------------------------------------------------------ model
    def _resolve_labels(self) -> list[str]:
        if self.label_names is None:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
            names = getattr(datamodule, "label_names", None)
            if not names:
                raise RuntimeError("ViTClassifierModule needs label_names: pass them, or use a data module with a "
                                   "`label_names` attribute (ChestXray14DataModule, CheXpertDataModule)")
            self.label_names = list(names)
        return self.label_names

    @override
    def configure_model(self) -> None:
        """Build the ViT once the label set is known (Lightning calls this before optimizers and restores)."""
        if self.model is not None or (self.label_names is None and self._trainer is None):
            return  # without labels yet (load_from_checkpoint), on_load_checkpoint builds it
        hp = self.hparams
        labels = self._resolve_labels()
        self.model = timm.create_model(hp.model_name, pretrained=False, num_classes=len(labels), img_size=hp.img_size,
                                       in_chans=hp.in_chans, global_pool=hp.global_pool,
                                       drop_path_rate=hp.drop_path_rate, **(hp.model_kwargs or {}))
        if hp.compile:
            compile_blocks(self.model)
        if self._trainer is None:  # built on its own: load now; under a trainer at fit start, unless restoring
            self._load_init()
        self.metrics = torch.nn.ModuleDict({s: MaskedMultilabelAUROC(len(labels)) for s in ("val", "test")})

    def _load_init(self) -> None:
        if self.hparams.init_from and not self._init_loaded:
            fresh = load_encoder_weights(self.model, self.hparams.init_from)
            rank_zero_info(f"Loaded encoder weights from {self.hparams.init_from}; fresh: {fresh}")
        self._init_loaded = True

    @override
    def on_fit_start(self) -> None:
        self._load_init()  # never for validate/test, nor when a checkpoint's weights were restored

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["label_names"] = self.label_names
        record_module_class(self, checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._init_loaded = True  # the checkpoint holds the weights: init_from is not read again
        if self.label_names is None:
            self.label_names = checkpoint.get("label_names")
        self.configure_model()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    # --------------------------------------------------------------------------------------------- training
    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BCE-with-logits averaged over the labelled entries (``-1`` = ignored, CheXpert "ignore" policy)."""
        valid = (labels >= 0).to(logits.dtype)
        per_entry = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0).to(logits.dtype), reduction="none")
        return (per_entry * valid).sum() / valid.sum().clamp(min=1)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["image"]), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        logits = self(batch["image"])
        self.log(f"{stage}/loss", self.loss(logits, batch["labels"]), sync_dist=True,
                 batch_size=batch["image"].shape[0])
        self.metrics[stage].update(logits, batch["labels"])

    def _end_eval(self, stage: str) -> tuple:
        macro, per_label, positives, negatives = self.metrics[stage].compute()
        self.metrics[stage].reset()
        undefined = [n for n, v in zip(self.label_names, per_label, strict=True) if v is None]
        metrics = {f"{stage}/auroc/{n}": v for n, v in zip(self.label_names, per_label, strict=True) if v is not None}
        metrics[f"{stage}/auroc_defined_labels"] = float(len(self.label_names) - len(undefined))
        self.log_dict(metrics, prog_bar=False)
        if macro is not None:
            self.log(f"{stage}/auroc_macro", macro, prog_bar=True)
        if not self.trainer.sanity_checking:
            self.warn_undefined(stage, undefined)
        return macro, per_label, positives, negatives

    def warn_undefined(self, stage: str, undefined: list[str]) -> None:
        """Warn about labels without an AUROC (no positives or no negatives) once per stage and set of labels: a
        validation set that never holds a label would otherwise repeat the same warning at every validation."""
        warned = self.__dict__.setdefault("_undefined_warned", {})
        if undefined and warned.get(stage) != undefined:
            rank_zero_warn(f"{stage}: AUROC undefined (no positives or no negatives) for {undefined}; "
                           "left out of the macro mean (said once while the set stays the same)")
        warned[stage] = undefined

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @override
    def on_test_epoch_end(self) -> None:
        macro, per_label, positives, negatives = self._end_eval("test")
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # collective under DDP: all ranks
        if self.hparams.auroc_table and self.trainer.is_global_zero:
            csv_path, png_path = write_auroc_table(run_dir / "test_auroc", self.label_names, per_label, positives,
                                                   negatives, macro)
            rank_zero_info(f"Per-label AUROC written to {csv_path} and {png_path}")
            log_auroc_table(self.trainer.loggers, csv_path, png_path)

    # ------------------------------------------------------------------------------------------ optimizer
    @override
    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.lr if hp.lr is not None else scaled_lr(hp.base_lr, effective_batch_size(self.trainer))
        groups = layer_decay_groups(self.model, lr, hp.weight_decay, hp.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas))
        total = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer,
                "lr_scheduler": warmup_cosine_scheduler(optimizer, hp.warmup_steps, total, hp.min_lr_ratio)}
