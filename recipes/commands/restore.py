"""``python -m recipes restore``: Selective Layer Restoration (arXiv 2602.06665).

Copies one contiguous range of transformer blocks from a base (pre-trained or SFT) model into its post-trained
version and writes the result as a Hugging Face folder (``save_pretrained`` model and tokenizer). With block
parameters ``theta^(l)``, the restored model is

    theta_restored^(l) = theta_base^(l)  for start <= l < stop,   theta_post^(l)  otherwise,

and every tensor outside the blocks (embedding, final norm, head) stays the post-trained one. Same architecture,
same parameter count, no inference cost. Both models can be local HF folders or checkpoints of this collection's
``CausalLMModule`` / ``GRPOModule`` (LoRA checkpoints must be merged first).

    python -m recipes restore --base runs/sft.ckpt --post runs/grpo.ckpt --blocks 1:3 --output restored/

The restored blocks are bitwise the base's: both models must have equal configs (heads, sizes, ... not only equal
tensor shapes) and the same dtype (``--dtype`` loads both in one), ``--output`` must be new or empty
(``--overwrite`` clears it), and the written folder is loaded back and compared tensor by tensor.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from callbacks.core.blocks import find_blocks
from datamodules.tokenizer import CHAR_TOKENIZER, load_tokenizer
from recipes.checkpoints import CheckpointError, load_checkpoint
from recipes.commands.checks import CommandError, check_output_dir, claim_output_dir
from recipes.parts.hf_model import build_causal_lm


def load_causal_lm(source: str, tokenizer: str | None = None, what: str = "--model",
                   dtype: str = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local HF folder or a ``CausalLMModule`` / ``GRPOModule`` checkpoint.

    ``tokenizer`` overrides the tokenizer (a local folder or ``"char"``); by default an HF folder's own tokenizer
    is used, and a checkpoint's data-module tokenizer. ``what`` names the argument in error messages. ``dtype``
    (``"auto"``: the stored precision, of a folder or of a checkpoint's weights) is the precision loaded in.
    Problems are :class:`CommandError` naming ``what``.
    """
    path = Path(source)
    if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise CommandError(f"--dtype={dtype!r} is not a torch dtype; expected auto, float32, bfloat16, float16")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CommandError(f"{what}={source!r} is a folder without config.json; give a Hugging Face model "
                               "folder (save_pretrained) or a checkpoint (.ckpt)")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        except Exception as err:  # noqa: BLE001 - truncated weights (SafetensorError), unknown model type, ...
            raise CommandError(f"{what}={source!r} does not load as a Hugging Face model: {type(err).__name__}: "
                               f"{' '.join(str(err).split())[:300]}") from err
        if tokenizer is None and not any(path.glob("tokenizer*")):
            raise CommandError(f"{what}={source!r} holds no tokenizer files; pass --tokenizer (a folder or 'char')")
        return model, load_tokenizer(tokenizer or str(path))
    if not path.is_file():
        raise CommandError(f"{what}={source!r} does not exist; give a Hugging Face model folder or a "
                           "CausalLMModule/GRPOModule checkpoint (.ckpt)")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:  # unreadable, or not a Lightning checkpoint: the message names the file
        raise CommandError(f"{what}={source!r} is neither a model folder nor a usable Lightning checkpoint: "
                           f"{err}") from err
    hp = ckpt.get("hyper_parameters", {})
    if hp.get("lora") is not None:
        raise CommandError(f"{what}={source!r} is a LoRA checkpoint; export it (python -m recipes export merges the "
                           "adapters) and pass the exported folder")
    tok = load_tokenizer(tokenizer or ckpt.get("datamodule_hyper_parameters", {}).get("tokenizer") or CHAR_TOKENIZER)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model_path, model_config = _architecture(ckpt.get("grpo_architecture") or hp, source, what)
    stored = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    model = build_causal_lm(model_path, model_config, tok, stored if dtype == "auto" else getattr(torch, dtype))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        missing, unexpected = [" ".join(str(err).split())[:300]], []
    if missing or unexpected:
        raise CommandError(f"{what}={source!r}: the checkpoint's weights do not match its model_config/model_path: "
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
        raise CommandError(f"{what}={source!r} takes its architecture from sft_checkpoint={sft!r}, which no "
                           "longer exists; restore that file or save the model as a Hugging Face folder")
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
        raise CommandError(f"--blocks={text!r} is not a range; expected START:STOP (0-based, STOP exclusive), "
                         f"e.g. 1:3, or a single block index") from None
    if not 0 <= start < stop <= num_blocks:
        raise CommandError(f"--blocks={text!r} is outside the model's {num_blocks} blocks; expected "
                         f"0 <= START < STOP <= {num_blocks}")
    return start, stop


# config fields that name, tokenize or run a model but do not change its weights' meaning
NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache",
                    "bos_token_id", "eos_token_id", "pad_token_id", "output_attentions", "output_hidden_states",
                    "return_dict", "attn_implementation"}


def config_differences(base: torch.nn.Module, post: torch.nn.Module) -> dict[str, tuple]:
    """``{field: (base value, post value)}`` of the architecture fields the two models' configs disagree on."""
    if getattr(base, "config", None) is None or getattr(post, "config", None) is None:
        return {}
    b, p = base.config.to_dict(), post.config.to_dict()
    keys = {k for k in b.keys() | p.keys() if k not in NOT_ARCHITECTURE and not k.startswith("_")}
    return {k: (b.get(k), p.get(k)) for k in sorted(keys) if b.get(k) != p.get(k)}


def check_same_architecture(base: torch.nn.Module, post: torch.nn.Module, blocks_path: str | None = None) -> None:
    """Raise a :class:`CommandError` naming ``--base`` and ``--post`` unless both have the same blocks, tensors,
    shapes, dtypes and config (8 attention heads and 4 have the same shapes, but not the same meaning)."""
    nb, np_ = len(find_blocks(base, blocks_path)), len(find_blocks(post, blocks_path))
    if nb != np_:
        raise CommandError(f"--base has {nb} blocks but --post has {np_}; restoration needs the same architecture")
    base_state, post_state = base.state_dict(), post.state_dict()
    only_base, only_post = sorted(base_state.keys() - post_state), sorted(post_state.keys() - base_state)
    if only_base or only_post:
        raise CommandError(f"--base and --post have different tensors: only in --base {only_base[:3]}, only in "
                           f"--post {only_post[:3]}; restoration needs the same architecture")
    differ = [k for k in base_state if base_state[k].shape != post_state[k].shape]
    if differ:
        k = differ[0]
        raise CommandError(f"--base and --post differ in shape at {len(differ)} tensors, e.g. {k}: --base "
                           f"{tuple(base_state[k].shape)} vs --post {tuple(post_state[k].shape)}; restoration "
                           "needs the same architecture")
    configs = config_differences(base, post)
    if configs:
        shown = ", ".join(f"{k}: --base {b!r} vs --post {p!r}" for k, (b, p) in list(configs.items())[:3])
        raise CommandError(f"--base and --post have different configs ({shown}); restoration needs the same "
                           "architecture")
    dtypes = [k for k in base_state if base_state[k].dtype != post_state[k].dtype]
    if dtypes:
        k = dtypes[0]
        raise CommandError(f"--base is {base_state[k].dtype} but --post is {post_state[k].dtype} (at {len(dtypes)} "
                           f"tensors, e.g. {k}): the restored blocks would be rounded, not the base's; pass --dtype "
                           "to load both in one precision")


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
    parser.add_argument("--output", required=True, help="folder to write the restored model and tokenizer to "
                                                        "(new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="clear a non-empty --output folder first")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or 'char' (default: the --post one's)")
    parser.add_argument("--dtype", default="auto", help="load both models in this precision (default: as stored; "
                                                        "they must then be equal)")
    parser.add_argument("--blocks_path", default=None, help="dotted path to the block list, for unknown models")
    return parser


@torch.no_grad()
def verify_written(out: Path, expected: torch.nn.Module) -> None:
    """Load ``out`` back: every tensor must be bitwise ``expected``'s."""
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype="auto").state_dict()
    want = expected.state_dict()
    wrong = [k for k, v in want.items() if k not in loaded or loaded[k].dtype != v.dtype or
             not torch.equal(loaded[k], v)]
    if wrong:
        raise CommandError(f"--output={str(out)!r}: the written model differs from the restored one at {len(wrong)} "
                           f"tensors, e.g. {wrong[0]}; delete it")


def main(argv: list[str] | None = None) -> Path:
    """Restore ``--blocks`` of ``--base`` into ``--post`` and save to ``--output``; returns the output folder."""
    args = build_parser().parse_args(argv)
    out = check_output_dir(args.output, "--output", args.overwrite)
    base, _ = load_causal_lm(args.base, args.tokenizer, "--base", args.dtype)
    post, tokenizer = load_causal_lm(args.post, args.tokenizer, "--post", args.dtype)
    check_same_architecture(base, post, args.blocks_path)
    start, stop = parse_block_range(args.blocks, len(find_blocks(post, args.blocks_path)))
    restore_blocks(base, post, start, stop, args.blocks_path)
    claim_output_dir(out, "--output", args.overwrite)
    post.save_pretrained(out)
    tokenizer.save_pretrained(out)
    verify_written(out, post)
    print(f"restored blocks {start}..{stop - 1} of {len(find_blocks(post, args.blocks_path))} from {args.base} into "
          f"{args.post}; wrote {out} (checked: loads back bitwise)")
    return out
