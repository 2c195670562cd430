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
from recipes.checkpoints import CheckpointError, load_module
from recipes.commands.checks import CommandError, check_output_dir, claim_output_dir

# the folder format of each module class export knows
FORMATS: dict[type[L.LightningModule], str] = {
    CausalLMModule: "causal_lm",
    GRPOModule: "causal_lm",
    ViTClassifierModule: "timm",
    MAEPretrainModule: "timm",
}


def special_tokens(tokenizer) -> dict[str, int | None]:
    """The tokenizer's ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` (the ids a model folder must carry)."""
    return {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}


def set_special_tokens(model, tokenizer) -> None:
    """Write the tokenizer's BOS/EOS/PAD ids into ``model.config`` and ``model.generation_config``: a random-init
    model keeps its family's defaults otherwise (GPT-2's EOS 50256, outside a small vocabulary), and
    ``generate()`` would never stop."""
    ids = special_tokens(tokenizer)
    if ids["eos_token_id"] is None:
        raise CommandError(f"the checkpoint's tokenizer ({type(tokenizer).__name__}) has no EOS token; an exported "
                           "model could not stop generating")
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            for key, value in ids.items():
                setattr(config, key, value)


def export_causal_lm(module: L.LightningModule, out: Path, keep_adapters: bool = False) -> Path:
    """Write ``module.model`` and its tokenizer with ``save_pretrained``; LoRA merged unless ``keep_adapters`` (then
    the adapters in ``out`` and the base model in ``out/base``). Returns the folder the full model loads from."""
    from peft import PeftModel

    model = module.model
    if isinstance(model, PeftModel):
        if keep_adapters:
            model.save_pretrained(out)
            model = model.unload()  # the base weights, adapters removed without merging
            out = out / "base"
        else:
            model = model.merge_and_unload()
    set_special_tokens(model, module.tokenizer)
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
    cfg = getattr(model, "pretrained_cfg", None) or {}
    statistics = {}
    for key in ("mean", "std"):  # the architecture's 3-channel statistics as their channel mean for 1 channel: what
        value = tuple(cfg.get(key) or ())  # timm would use anyway, saying so on every export ("does not match")
        if value and len(value) != hp.in_chans:
            statistics[key] = (sum(value) / len(value),) * hp.in_chans
    save_for_hf(model, str(out), model_config={"architecture": hp.model_name, "pretrained_cfg": statistics, **extra},
                model_args=model_args, safe_serialization=True)
    return out


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to the rounding of merging adapters / reloading (relative to the outputs' scale)."""
    tol = 1e-4 if want.dtype == torch.float32 else 2e-2
    return bool((got.float() - want.float()).abs().max() <= tol * (1 + want.float().abs().max()))


PROBE_IDS = torch.arange(1, 9).unsqueeze(0)  # the token ids whose logits the written folder must reproduce


def probe_ids(model: torch.nn.Module) -> torch.Tensor:
    """:data:`PROBE_IDS` within ``model``'s vocabulary."""
    return PROBE_IDS.remainder(model.get_input_embeddings().num_embeddings)


@torch.no_grad()
def verify_causal_lm(out: Path, logits: torch.Tensor, tokenizer) -> None:
    """Load the written folder back (``out/base`` + the adapters in ``out`` when it holds adapters): its logits on
    :data:`PROBE_IDS` must be ``logits`` (the checkpoint's, computed before writing), its special tokens and chat
    template the checkpoint tokenizer's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base = out / "base" if (out / "adapter_config.json").is_file() else out
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype="auto")
    if base != out:
        model = PeftModel.from_pretrained(model, out)
    model.eval()
    if not _close(model(probe_ids(model)).logits, logits):
        raise CommandError(f"the model written to {out} does not give the checkpoint's logits; delete it")
    want = special_tokens(tokenizer)
    generation = GenerationConfig.from_pretrained(base, local_files_only=True)
    for source, got in (("config.json", model.config), ("generation_config.json", generation)):
        wrong = {k: getattr(got, k, None) for k, v in want.items() if getattr(got, k, None) != v}
        if wrong:
            raise CommandError(f"{base / source} holds {wrong}, not the tokenizer's {want}")
    if AutoTokenizer.from_pretrained(base, local_files_only=True).chat_template != tokenizer.chat_template:
        raise CommandError(f"the tokenizer written to {base} lost its chat template")


@torch.no_grad()
def verify_timm(module: L.LightningModule, out: Path) -> None:
    """Load the written folder with timm; its outputs on a random image batch must be the checkpoint's."""
    import timm

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    source = module.encoder if hasattr(module, "encoder") else module.model
    hp = module.hparams
    size = hp.img_size if isinstance(hp.img_size, int) else hp.img_size[0]
    images = torch.randn(2, hp.in_chans, size, size, generator=torch.Generator().manual_seed(0))
    if not _close(model(images), source(images)):
        raise CommandError(f"the model written to {out} does not give the checkpoint's outputs; delete it")


def export_checkpoint(ckpt_path: str | Path, out: str | Path, keep_adapters: bool = False,
                      overwrite: bool = False) -> Path:
    """Export ``ckpt_path`` into the folder ``out`` (new or empty; cleared first with ``overwrite``) and verify
    what was written; returns ``out``."""
    out = check_output_dir(out, "--out", overwrite)
    try:
        module = load_module(ckpt_path, FORMATS)
    except CheckpointError as err:
        raise CommandError(f"--ckpt_path: {err}") from err
    kind = FORMATS[type(module)]
    claim_output_dir(out, "--out", overwrite)
    with torch.no_grad():
        if kind == "causal_lm":
            logits = module.model.eval()(probe_ids(module.model)).logits  # before merging changes the model
            export_causal_lm(module, out, keep_adapters)
            verify_causal_lm(out, logits, module.tokenizer)
        else:
            if keep_adapters:
                raise CommandError(f"--keep_adapters: {ckpt_path} is a {type(module).__name__} checkpoint, "
                                   "which has no LoRA adapters")
            export_timm(module, out)
            verify_timm(module, out)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``export`` command's arguments."""
    parser = argparse.ArgumentParser(prog="python -m recipes export", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by python -m recipes fit")
    parser.add_argument("--out", "--output", dest="out", default=None,
                        help="the folder to write, new or empty (default: exported/<checkpoint name>)")
    parser.add_argument("--overwrite", action="store_true", help="clear a non-empty --out folder first")
    parser.add_argument("--keep_adapters", action="store_true",
                        help="LoRA: save the peft adapters (and the base model in <out>/base) instead of merging")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every argument of ``export``, checked before anything is loaded or written."""
    ckpt = Path(args.ckpt_path)
    if not ckpt.is_file():
        parser.error(f"--ckpt_path={args.ckpt_path!r} is not a file; give a .ckpt written by python -m recipes fit")
    if args.out is None:
        args.out = str(Path("exported") / ckpt.stem)
    if Path(args.out).resolve() in (ckpt.resolve(), *ckpt.resolve().parents):
        parser.error(f"--out={args.out!r} holds the checkpoint itself; choose another folder")


def main(argv: list[str] | None = None) -> Path:
    """``export``: parse ``argv`` (the arguments after the command's name) and export the checkpoint."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    out = export_checkpoint(args.ckpt_path, args.out, args.keep_adapters, args.overwrite)
    if args.keep_adapters and (out / "base").is_dir():
        print(f"Exported {args.ckpt_path}: LoRA adapters in {out}, base model in {out / 'base'} (checked: same logits)")
    else:
        print(f"Exported {args.ckpt_path} to {out} (checked: it loads and gives the checkpoint's outputs)")
    return out
