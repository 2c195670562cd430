"""``python -m recipes export --ckpt_path <ckpt> --out <dir>``: a trained checkpoint in the format other tools load.

- ``CausalLMModule`` / ``GRPOModule``: a Hugging Face folder (``save_pretrained`` model + tokenizer) that loads with
  ``AutoModelForCausalLM.from_pretrained(out)``. LoRA adapters are merged into the weights, unless
  ``--keep_adapters``: then ``out`` holds the peft adapters and ``out/base`` the base model.
- ``ViTClassifierModule`` / ``MAEPretrainModule`` (its encoder): a timm folder (``config.json`` +
  ``model.safetensors``) that loads with ``timm.create_model("local-dir:<out>", pretrained=True)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

from recipes import CausalLMModule, GRPOModule, MAEPretrainModule, ViTClassifierModule
from recipes.checkpoints import load_module

# the folder format of each module class export knows
FORMATS: dict[type[L.LightningModule], str] = {
    CausalLMModule: "causal_lm",
    GRPOModule: "causal_lm",
    ViTClassifierModule: "timm",
    MAEPretrainModule: "timm",
}


def export_causal_lm(module: L.LightningModule, out: Path, keep_adapters: bool = False) -> Path:
    """Write ``module.model`` and its tokenizer with ``save_pretrained``; LoRA merged unless ``keep_adapters``."""
    from peft import PeftModel

    model = module.model
    if isinstance(model, PeftModel):
        if keep_adapters:
            model.save_pretrained(out)
            model = model.unload()  # the base weights, adapters removed without merging
            out = out / "base"
        else:
            model = model.merge_and_unload()
    model.save_pretrained(out)
    module.tokenizer.save_pretrained(out)
    return out


def export_timm(module: L.LightningModule, out: Path) -> Path:
    """Write a timm ``config.json`` + ``model.safetensors`` (the classifier, or the MAE encoder)."""
    from timm.models import save_for_hf

    hp = module.hparams
    if hasattr(module, "encoder"):  # MAE: the encoder, no head
        model, extra = module.encoder, {}
        model_args = {"img_size": hp.img_size, "in_chans": hp.in_chans, **(hp.model_kwargs or {})}
    else:
        model, extra = module.model, {"label_names": list(module.label_names)}
        model_args = {"img_size": hp.img_size, "in_chans": hp.in_chans, "global_pool": hp.global_pool,
                      **(hp.model_kwargs or {})}
    save_for_hf(model, str(out), model_config={"architecture": hp.model_name, **extra}, model_args=model_args,
                safe_serialization=True)
    return out


def export_checkpoint(ckpt_path: str | Path, out: str | Path, keep_adapters: bool = False) -> Path:
    """Export ``ckpt_path`` into the folder ``out`` (created); returns the folder a model loads from."""
    out = Path(out)
    module = load_module(ckpt_path, FORMATS)
    kind = FORMATS[type(module)]
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        return export_causal_lm(module, out, keep_adapters) if kind == "causal_lm" else export_timm(module, out)


def main(argv: list[str] | None = None) -> None:
    """``export``: parse ``argv`` (the arguments after the command's name) and export the checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m recipes export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by python -m recipes fit")
    parser.add_argument("--out", required=True, help="the folder to write (created)")
    parser.add_argument("--keep_adapters", action="store_true",
                        help="LoRA: save the peft adapters (and the base model in <out>/base) instead of merging")
    args = parser.parse_args(argv)
    folder = export_checkpoint(args.ckpt_path, args.out, args.keep_adapters)
    print(f"Exported {args.ckpt_path} to {folder}")
