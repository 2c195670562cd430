r"""Locate the transformer blocks and the always-on parts of any supported model.

Every layer-wise callback needs the same two things: the ordered list of transformer blocks, and the
parameters that sit outside them (input embedding, output head, final norm). :func:`find_blocks` finds
them for Hugging Face causal LMs (Llama, Qwen2, Mistral, Gemma, GPT-2, GPT-NeoX, OPT, ...) and timm
ViTs, also when they are wrapped (a LightningModule holding ``self.model``, a peft ``PeftModel``).

The model is asked first: a timm model names its blocks in ``group_matcher()`` (the ``blocks`` group,
``^blocks\.(\d+)``), a Hugging Face model has ``config.num_hidden_layers`` blocks of a class listed in its
``_no_split_modules``. Names are guessed last (a list called ``layers``, ``h``, ``blocks``, ...). Anything else
takes an explicit ``blocks_path`` (a dotted attribute path to the ``nn.ModuleList``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

# Names (last path component, or a dotted suffix) of the ModuleList holding the blocks, in priority order.
_BLOCK_LIST_SUFFIXES = ("layers", "h", "blocks", "block", "layer")

# Parameter-name rules for the parts outside the blocks, matched on the full dotted name.
_EMBEDDING = re.compile(
    r"(^|\.)(embed_tokens|embed_positions|embed_in|wte|wpe|patch_embed|cls_token|pos_embed|reg_token)(\.|$)"
)
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|head|score|classifier)(\.|$)")
_NORM = re.compile(r"(^|\.)(norm|ln_f|final_layer_norm|final_layernorm|fc_norm|final_norm)(\.|$)")

PARTS = ("embedding", "head", "final_norm")


@dataclass
class ModelParts:
    """What :func:`find_blocks` found: the blocks in order, and the parameter names of the other parts.

    ``embedding``, ``head``, ``final_norm`` and ``other`` hold parameter names as they appear in
    ``model.named_parameters()`` (tied weights appear once, under the embedding).
    """

    blocks: nn.ModuleList | nn.Sequential
    blocks_path: str
    embedding: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    final_norm: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.blocks)

    def part_names(self, part: str) -> list[str]:
        if part not in (*PARTS, "other"):
            raise ValueError(f"Unknown part {part!r}; expected one of {(*PARTS, 'other')}")
        return getattr(self, part)


def _get_dotted(module: nn.Module, path: str) -> nn.Module:
    obj = module
    for attr in path.split("."):
        obj = obj[int(attr)] if attr.isdigit() else getattr(obj, attr)
    return obj


def _looks_like_block_list(module: nn.Module) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        return False
    first = type(module[0])
    return all(type(m) is first for m in module) and any(True for _ in module[0].parameters())


def _find_block_path(model: nn.Module) -> str | None:
    """The model's own answer (:func:`_block_path_from_model`), else the first block list with a known name."""
    for prefix, module in model.named_modules():
        path = _block_path_from_model(module)
        if path is not None:
            return f"{prefix}.{path}" if prefix else path
    candidates = [(name, mod) for name, mod in model.named_modules() if _looks_like_block_list(mod)]
    for suffix in _BLOCK_LIST_SUFFIXES:
        for name, _ in candidates:
            if name == suffix or name.endswith("." + suffix):
                return name
    return None


def _block_path_from_model(module: nn.Module) -> str | None:
    """Where ``module`` itself says its blocks are: a timm model's ``group_matcher()`` ``blocks`` group, or the
    block list of a Hugging Face model (``config.num_hidden_layers`` blocks of a ``_no_split_modules`` class)."""
    matcher = getattr(module, "group_matcher", None)
    if callable(matcher):
        try:
            groups = matcher()
        except (TypeError, NotImplementedError, AttributeError):
            groups = {}
        pattern = groups.get("blocks") if isinstance(groups, dict) else None
        if isinstance(pattern, (list, tuple)) and pattern:
            pattern = pattern[0][0] if isinstance(pattern[0], (list, tuple)) else pattern[0]
        found = re.fullmatch(r"\^(\w+(?:\\\.\w+)*)\\\.\(\\d\+\)", pattern) if isinstance(pattern, str) else None
        if found:
            path = found.group(1).replace("\\.", ".")
            try:
                if _looks_like_block_list(_get_dotted(module, path)):
                    return path
            except (AttributeError, IndexError):
                pass
    config = getattr(module, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or not hasattr(module, "base_model"):
        return None
    block_classes = set(getattr(module, "_no_split_modules", None) or ())
    for name, child in module.named_modules():
        if (_looks_like_block_list(child) and len(child) == layers
                and (not block_classes or type(child[0]).__name__ in block_classes)):
            return name
    return None


def find_blocks(model: nn.Module, blocks_path: str | None = None) -> ModelParts:
    """Return the ordered transformer blocks of ``model`` and the names of its always-on parameters.

    Args:
        model: a Hugging Face causal LM, a timm ViT, or any module containing one (e.g. a LightningModule).
        blocks_path: dotted path from ``model`` to the ``nn.ModuleList`` (or ``nn.Sequential``) of blocks, for
            models the automatic search does not know (e.g. ``"model.decoder.layers"``).
    """
    if blocks_path is None:
        blocks_path = _find_block_path(model)
        if blocks_path is None:
            raise ValueError(
                f"Could not locate the transformer blocks of {type(model).__name__}: no nn.ModuleList/Sequential named "
                f"{'/'.join(_BLOCK_LIST_SUFFIXES)} of identical blocks was found. Pass blocks_path='<dotted.path>' "
                "pointing at the nn.ModuleList of blocks (for example 'model.layers')."
            )
    try:
        blocks = _get_dotted(model, blocks_path)
    except (AttributeError, IndexError) as err:
        raise ValueError(f"blocks_path={blocks_path!r} does not exist on {type(model).__name__}: {err}") from err
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"blocks_path={blocks_path!r} on {type(model).__name__} is a {type(blocks).__name__}, "
                         "expected an nn.ModuleList (or nn.Sequential) of transformer blocks")

    in_blocks = {id(p) for p in blocks.parameters()}
    parts = ModelParts(blocks=blocks, blocks_path=blocks_path)
    input_embedding = _hf_embedding_ids(model, "get_input_embeddings")
    output_embedding = _hf_embedding_ids(model, "get_output_embeddings")
    for name, param in model.named_parameters():
        if id(param) in in_blocks:
            continue
        if id(param) in input_embedding or _EMBEDDING.search(name):
            parts.embedding.append(name)
        elif id(param) in output_embedding or _HEAD.search(name):
            parts.head.append(name)
        elif _NORM.search(name):
            parts.final_norm.append(name)
        else:
            parts.other.append(name)
    return parts


def _hf_embedding_ids(model: nn.Module, getter: str) -> set[int]:
    """Parameter ids of the first Hugging Face input/output embedding found in ``model`` (empty if none)."""
    for module in model.modules():
        fn = getattr(module, getter, None)
        if callable(fn) and hasattr(module, "config"):
            try:
                emb = fn()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(emb, nn.Module):
                return {id(p) for p in emb.parameters()}
    return set()


def block_parameter_names(model: nn.Module, parts: ModelParts, index: int) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters of block ``index``."""
    ids = {id(p) for p in parts.blocks[index].parameters()}
    return [name for name, p in model.named_parameters() if id(p) in ids]
