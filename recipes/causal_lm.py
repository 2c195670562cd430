"""Fine-tuning of any Hugging Face causal LM (full, or LoRA through peft as the baseline for layer sampling)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from transformers import PreTrainedTokenizerBase

from callbacks.core.compiled_blocks import check_compile_setting, compile_blocks
from datamodules.tokenizer import load_tokenizer
from recipes.checkpoints import record_module_class
from recipes.parts.chunked_head import chunked_cross_entropy, chunked_head_matches, last_hidden_state, split_lm
from recipes.parts.hf_model import (
    build_causal_lm,
    check_sequence_lengths,
    module_tokenizer,
)
from recipes.parts.optim import decay_groups, warmup_cosine_scheduler


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft). ``target_modules="all-linear"`` adapts every linear layer but the head."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"

    @classmethod
    def parse(cls, value: LoraSettings | dict | None) -> LoraSettings | None:
        """``None``, a ``LoraSettings`` or its fields as a dict (the form YAML and the command line give)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"lora must be LoRA settings such as {{r: 8, alpha: 16}} or null, got {value!r}")
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown lora settings {sorted(unknown)}; expected some of "
                             f"{[f.name for f in fields(cls)]}")
        return cls(**value)


@dataclass
class EvalTally:
    """Running sums of one validation/test epoch on this rank."""

    loss_sum: float = 0.0  # cross-entropy x response tokens
    tokens: int = 0  # response tokens
    correct: int = 0  # greedy answers equal to the reference
    answered: int = 0  # answers generated
    batches: int = 0

    def sums(self) -> list[float]:
        """The four sums that are added up over ranks."""
        return [self.loss_sum, self.tokens, self.correct, self.answered]


class CausalLMModule(L.LightningModule):
    """Supervised fine-tuning of a causal LM with the loss on response tokens.

    Args:
        model_path: a local ``from_pretrained`` directory. ``None`` builds a random-init model from ``model_config``.
        model_config: ``AutoConfig.for_model`` keyword arguments (``model_type`` plus the config fields);
            ``vocab_size`` is taken from the tokenizer.
        tokenizer_name: tokenizer name or directory; ``None`` uses the data module's tokenizer.
        optimizer: optimizer class and arguments (AdamW by default), applied to the named groups
            ``decay`` / ``no_decay``.
        warmup_steps: linear warm-up length in optimizer steps.
        min_lr_ratio: final learning rate of the cosine decay as a fraction of the peak.
        lr_schedule: ``cosine`` (warm-up then cosine) or ``constant`` (warm-up then flat).
        lora: LoRA settings; ``None`` trains all weights.
        gradient_checkpointing: recompute block activations in backward (non-reentrant).
        exact_match_batches: validation/test batches on which greedy answers are generated for ``exact_match``.
        max_new_tokens: generation budget for exact-match answers.
        loss_chunk_size: labelled positions projected through the output head at a time for the loss (fp32
            full-vocabulary logits exist for one chunk only, in forward and backward; see
            ``recipes.parts.chunked_head``); ``None`` computes the plain Hugging Face loss, as does a model whose
            logits are not ``head(hidden)`` (checked on the first batch, with a warning).
        compile: compile each transformer block with ``torch.compile`` once LoRA and gradient checkpointing are
            applied (``callbacks.core.compiled_blocks``): same results as eager, and LISA/OwLore/BAdam switches and
            layer-drop patterns do not recompile. Not a defining setting: a run may resume with it toggled.
    """

    # the settings that define the trained model: a resumed run must give the checkpoint's (recipes.resume)
    defining_settings: frozenset[str] = frozenset({"model_path", "model_config", "tokenizer_name", "lora"})

    def __init__(
        self,
        model_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer_name: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        lr_schedule: str = "cosine",
        lora: LoraSettings | dict | None = None,
        gradient_checkpointing: bool = False,
        exact_match_batches: int = 2,
        max_new_tokens: int = 16,
        loss_chunk_size: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_compile_setting(compile)
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be a positive integer or None, got {loss_chunk_size}")
        if model_path is not None and model_config is not None:
            raise ValueError("Give either model_path (a from_pretrained directory) or model_config, not both")
        self.lora = LoraSettings.parse(lora)
        lora = None if self.lora is None else asdict(self.lora)  # checkpoints hold plain values
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.model: torch.nn.Module | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = load_tokenizer(tokenizer_name) if tokenizer_name else None
        self._tally: dict[str, EvalTally] = {}

    # ----------------------------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        """Build the model once the tokenizer is known (Lightning calls this before optimizers and restores)."""
        if self.model is not None or (self.tokenizer is None and self._trainer is None):
            return  # without a tokenizer yet (load_from_checkpoint), on_load_checkpoint builds it
        hp = self.hparams
        model = build_causal_lm(hp.model_path, hp.model_config, module_tokenizer(self),
                                gradient_checkpointing=hp.gradient_checkpointing)
        if self.lora is not None:
            model = _apply_lora(model, self.lora)
        if hp.compile:  # last, on the finished blocks (adapters and checkpointing in place)
            compile_blocks(model)
        self.model = model

    def on_fit_start(self) -> None:
        """Sequences the data can produce must fit the model's positions (checked before the first step)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or "max_length" not in getattr(datamodule, "hparams", {}):
            return
        lengths = {"data.max_length": int(datamodule.hparams.max_length)}
        prompts = [len(e["prompt_ids"]) for split in ("val", "test")
                   for e in getattr(datamodule, "datasets", {}).get(split, []) if "prompt_ids" in e]
        if prompts and self.hparams.exact_match_batches > 0:
            lengths["longest evaluation prompt + model.max_new_tokens"] = max(prompts) + self.hparams.max_new_tokens
        check_sequence_lengths(self.model, lengths)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        record_module_class(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.model is None and self.tokenizer is None:
            name = checkpoint.get("datamodule_hyper_parameters", {}).get("tokenizer")
            if name:
                self.tokenizer = load_tokenizer(name)
        self.configure_model()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def lm_loss(self, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy over the labelled (response) tokens of ``batch`` (padded or packed)."""
        inputs, labels = model_inputs(self.model, batch)
        chunk = self.hparams.loss_chunk_size
        if chunk is None or not chunked_head_matches(self.model, inputs["input_ids"]):
            return self.model(**inputs, labels=labels, use_cache=False).loss
        hidden = last_hidden_state(self.model, **inputs)
        return chunked_cross_entropy(hidden[:, :-1], split_lm(self.model)[1], labels[:, 1:], chunk)

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.lm_loss(batch)
        rows = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        self.log("data/padding_fraction", padding_fraction(batch), batch_size=rows)
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        loss = self.lm_loss(batch)
        tally = self._tally[stage]
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        tally.loss_sum += float(loss) * tokens
        tally.tokens += tokens
        if "answers" in batch and tally.batches < self.hparams.exact_match_batches:
            answers = self.generate_answers(batch)
            tally.correct += sum(p.strip() == a.strip() for p, a in zip(answers, batch["answers"], strict=True))
            tally.answered += len(answers)
        tally.batches += 1

    def _end_eval(self, stage: str) -> None:
        """Token-weighted loss, perplexity and exact match, summed over ranks."""
        totals = self.all_gather(torch.tensor(self._tally[stage].sums(), dtype=torch.float64, device=self.device))
        if totals.ndim == 2:
            totals = totals.sum(0)
        loss = float(totals[0] / totals[1].clamp(min=1))
        metrics = {f"{stage}/loss": loss, f"{stage}/perplexity": math.exp(min(loss, 50.0))}
        if totals[3] > 0:
            metrics[f"{stage}/exact_match"] = float(totals[2] / totals[3])
        self.log_dict(metrics, prog_bar=True, sync_dist=True)  # already summed over ranks; silences the DDP warning

    def on_validation_epoch_start(self) -> None:
        self._tally["val"] = EvalTally()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._tally["test"] = EvalTally()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    @torch.no_grad()
    def generate_answers(self, batch: dict) -> list[str]:
        """Greedy answers to the left-padded prompts of ``batch``, decoded without special tokens."""
        tokenizer = module_tokenizer(self)
        prompt = batch["prompt_input_ids"]
        out = self.model.generate(input_ids=prompt, attention_mask=batch["prompt_attention_mask"], do_sample=False,
                                  max_new_tokens=self.hparams.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
        return tokenizer.batch_decode(out[:, prompt.shape[1]:], skip_special_tokens=True)

    # ------------------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(decay_groups(self.model))
        hp = self.hparams
        min_ratio = hp.min_lr_ratio if hp.lr_schedule == "cosine" else 1.0  # 1.0: constant after warm-up
        scheduler = warmup_cosine_scheduler(optimizer, hp.warmup_steps, int(self.trainer.estimated_stepping_batches),
                                            min_ratio)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def model_inputs(model: torch.nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The model's inputs and the labels of a padded batch (``attention_mask``) or a packed one (``position_ids``
    restarting per example and no mask, from which transformers keeps attention inside each example). Flash
    attention finds the examples from the position ids only in a one-row batch, so there a packed batch is laid
    out as one row (its loss is unchanged: each row starts with a masked label)."""
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, batch["labels"]
    inputs, labels = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}, batch["labels"]
    if "flash" in str(getattr(model.config, "_attn_implementation", "")):
        inputs, labels = {k: v.reshape(1, -1) for k, v in inputs.items()}, labels.reshape(1, -1)
    return inputs, labels


def padding_fraction(batch: dict) -> torch.Tensor:
    """The share of the batch's positions that hold padding rather than tokens of an example."""
    tokens = (batch["num_tokens"] if "num_tokens" in batch else batch["attention_mask"]).sum()
    return 1.0 - tokens.float() / batch["input_ids"].numel()


def _apply_lora(model: torch.nn.Module, lora: LoraSettings) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    # GPT-2-type models store their linear layers transposed (Conv1D): peft must be told, or it warns and guesses
    transposed = any(isinstance(m, Conv1D) for m in model.modules())
    cfg = LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.target_modules, fan_in_fan_out=transposed)
    return get_peft_model(model, cfg)
