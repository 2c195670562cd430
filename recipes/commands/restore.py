"""``python -m recipes restore``: Selective Layer Restoration (arXiv 2602.06665).

Copies one contiguous range of transformer blocks from a base (pre-trained or SFT) model into its post-trained
version and writes the result as a Hugging Face folder (``save_pretrained`` model and tokenizer). With block
parameters ``theta^(l)``, the restored model is

    theta_restored^(l) = theta_base^(l)  for start <= l < stop,   theta_post^(l)  otherwise,

and every tensor outside the blocks (embedding, final norm, head) stays the post-trained one. Same architecture,
same parameter count, no inference cost. Both models can be local HF folders or checkpoints of this collection's
``CausalLMModule`` / ``GRPOModule`` (LoRA checkpoints must be merged first).

    python -m recipes restore --base runs/sft.ckpt --post runs/grpo.ckpt --blocks 1:3 --output restored/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from callbacks.core.blocks import find_blocks
from datamodules.tokenizer import CHAR_TOKENIZER, load_tokenizer
from recipes.checkpoints import CheckpointError, load_checkpoint
from recipes.parts.hf_model import build_causal_lm


def load_causal_lm(source: str, tokenizer: str | None = None, what: str = "--model",
                   dtype: str = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local HF folder or a ``CausalLMModule`` / ``GRPOModule`` checkpoint.

    ``tokenizer`` overrides the tokenizer (a local folder or ``"char"``); by default an HF folder's own tokenizer
    is used, and a checkpoint's data-module tokenizer. ``what`` names the argument in error messages. ``dtype``
    applies to HF folders (``"auto"`` keeps the stored precision); checkpoints load as saved.
    """
    path = Path(source)
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        if tokenizer is None and not any(path.glob("tokenizer*")):
            raise ValueError(f"{what}={source!r} holds no tokenizer files; pass --tokenizer (a folder or 'char')")
        return model, load_tokenizer(tokenizer or str(path))
    if not path.is_file():
        raise FileNotFoundError(f"{what}={source!r} does not exist; give a Hugging Face model folder or a "
                                "CausalLMModule/GRPOModule checkpoint (.ckpt)")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:  # unreadable, or not a Lightning checkpoint: the message names the file
        raise ValueError(f"{what}={source!r} is neither a model folder nor a usable Lightning checkpoint: "
                         f"{err}") from err
    hp = ckpt.get("hyper_parameters", {})
    if hp.get("lora") is not None:
        raise ValueError(f"{what}={source!r} is a LoRA checkpoint; merge the adapters into the model first")
    tok = load_tokenizer(tokenizer or ckpt.get("datamodule_hyper_parameters", {}).get("tokenizer") or CHAR_TOKENIZER)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model_path, model_config = _architecture(ckpt.get("grpo_architecture") or hp, source, what)
    model = build_causal_lm(model_path, model_config, tok)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        missing, unexpected = [" ".join(str(err).split())[:300]], []
    if missing or unexpected:
        raise ValueError(f"{what}={source!r}: the checkpoint's weights do not match its model_config/model_path: "
                         f"missing or mismatched {missing[:3]}, unexpected {unexpected[:3]}")
    return model, tok


def _architecture(hp: dict, source: str, what: str) -> tuple[str | None, dict | None]:
    """``(model_path, model_config)`` of a checkpoint (``hp``: its ``grpo_architecture`` or hyper-parameters); an
    older ``GRPOModule`` checkpoint started from ``sft_checkpoint`` without its own architecture takes that file's."""
    if hp.get("model_path") or hp.get("model_config"):
        return hp.get("model_path"), hp.get("model_config")
    sft = hp.get("sft_checkpoint")
    if sft is None:
        return None, None  # built with the default model config
    if not Path(sft).is_file():
        raise ValueError(f"{what}={source!r} takes its architecture from sft_checkpoint={sft!r}, which no longer "
                         "exists; restore that file or save the model as a Hugging Face folder")
    sft_hp = load_checkpoint(sft).get("hyper_parameters", {})
    return sft_hp.get("model_path"), sft_hp.get("model_config")


def parse_block_range(text: str, num_blocks: int) -> tuple[int, int]:
    """``"start:stop"`` (0-based, stop exclusive, like a Python slice; ``"3"`` means ``3:4``) checked against
    ``num_blocks``."""
    parts = text.split(":")
    try:
        if len(parts) == 1:
            start = int(parts[0])
            stop = start + 1
        elif len(parts) == 2:
            start, stop = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"--blocks={text!r} is not a range; expected START:STOP (0-based, STOP exclusive), "
                         f"e.g. 1:3, or a single block index") from None
    if not 0 <= start < stop <= num_blocks:
        raise ValueError(f"--blocks={text!r} is outside the model's {num_blocks} blocks; expected "
                         f"0 <= START < STOP <= {num_blocks}")
    return start, stop


def check_same_architecture(base: torch.nn.Module, post: torch.nn.Module, blocks_path: str | None = None) -> None:
    """Raise a ``ValueError`` naming ``--base`` and ``--post`` unless both have the same tensors and shapes."""
    nb, np_ = len(find_blocks(base, blocks_path)), len(find_blocks(post, blocks_path))
    if nb != np_:
        raise ValueError(f"--base has {nb} blocks but --post has {np_}; restoration needs the same architecture")
    base_shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    post_shapes = {k: tuple(v.shape) for k, v in post.state_dict().items()}
    only_base, only_post = sorted(base_shapes.keys() - post_shapes), sorted(post_shapes.keys() - base_shapes)
    if only_base or only_post:
        raise ValueError(f"--base and --post have different tensors: only in --base {only_base[:3]}, only in --post "
                         f"{only_post[:3]}; restoration needs the same architecture")
    differ = [k for k in base_shapes if base_shapes[k] != post_shapes[k]]
    if differ:
        k = differ[0]
        raise ValueError(f"--base and --post differ in shape at {len(differ)} tensors, e.g. {k}: --base "
                         f"{base_shapes[k]} vs --post {post_shapes[k]}; restoration needs the same architecture")


@torch.no_grad()
def restore_blocks(base: torch.nn.Module, post: torch.nn.Module, start: int, stop: int,
                   blocks_path: str | None = None) -> torch.nn.Module:
    """Copy blocks ``start .. stop-1`` (parameters and buffers) of ``base`` into ``post`` in place; returns ``post``."""
    check_same_architecture(base, post, blocks_path)
    base_blocks, post_blocks = find_blocks(base, blocks_path).blocks, find_blocks(post, blocks_path).blocks
    parse_block_range(f"{start}:{stop}", len(post_blocks))
    for i in range(start, stop):
        target = post_blocks[i].state_dict()
        for name, tensor in base_blocks[i].state_dict().items():
            target[name].copy_(tensor)
    return post


def build_parser() -> argparse.ArgumentParser:
    """The ``restore`` command's arguments."""
    parser = argparse.ArgumentParser(prog="python -m recipes restore", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--base", required=True, help="base model: HF folder or CausalLMModule/GRPOModule .ckpt")
    parser.add_argument("--post", required=True, help="post-trained model: HF folder or .ckpt")
    parser.add_argument("--blocks", required=True, help="block range START:STOP (0-based, STOP exclusive)")
    parser.add_argument("--output", required=True, help="folder to write the restored model and tokenizer to")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or 'char' (default: the --post one's)")
    parser.add_argument("--blocks_path", default=None, help="dotted path to the block list, for unknown models")
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Restore ``--blocks`` of ``--base`` into ``--post`` and save to ``--output``; returns the output folder."""
    args = build_parser().parse_args(argv)
    base, _ = load_causal_lm(args.base, args.tokenizer, "--base")
    post, tokenizer = load_causal_lm(args.post, args.tokenizer, "--post")
    check_same_architecture(base, post, args.blocks_path)
    start, stop = parse_block_range(args.blocks, len(find_blocks(post, args.blocks_path)))
    restore_blocks(base, post, start, stop, args.blocks_path)
    out = Path(args.output)
    post.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"restored blocks {start}..{stop - 1} of {len(find_blocks(post, args.blocks_path))} from {args.base} into "
          f"{args.post}; wrote {out}")
    return out
