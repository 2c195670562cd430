"""The block finder on tiny random-init models of every supported architecture."""

import pytest
import timm
from torch import nn

from callbacks.core.blocks import _block_path_from_model, block_parameter_names, find_blocks
from tests.conftest import ARCHITECTURES, tiny_model

HF_ARCHS = sorted(a for a in ARCHITECTURES if a != "vit")
EXPECTED_PATH = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers",
                 "gemma": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers",
                 "opt": "model.decoder.layers"}


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_causal_lm(arch):
    model = tiny_model(arch, layers=3)
    parts = find_blocks(model)
    assert parts.blocks_path == EXPECTED_PATH[arch]
    assert len(parts) == 3
    assert parts.blocks is _resolve(model, EXPECTED_PATH[arch])
    assert parts.embedding, "input embedding not found"
    assert parts.final_norm, "final norm not found"
    assert parts.other == [], f"unclassified parameters: {parts.other}"
    emb = model.get_input_embeddings().weight
    named = dict(model.named_parameters())
    assert any(named[n] is emb for n in parts.embedding)
    if not model.config.tie_word_embeddings:
        head = model.get_output_embeddings().weight
        assert [n for n in parts.head if named[n] is head]
    # every parameter is accounted for exactly once
    in_blocks = sum(len(block_parameter_names(model, parts, i)) for i in range(len(parts)))
    outside = len(parts.embedding) + len(parts.head) + len(parts.final_norm)
    assert in_blocks + outside == len(named)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_patch16_224",
                                  "vit_base_patch16_224"])
def test_timm_vit(name):
    model = timm.create_model(name, pretrained=False, num_classes=5, img_size=32, depth=2)
    parts = find_blocks(model)
    assert parts.blocks_path == "blocks" and len(parts) == 2
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(parts.embedding)
    assert parts.head == ["head.weight", "head.bias"]
    assert parts.final_norm == ["norm.weight", "norm.bias"]


def test_wrapped_model_and_lora():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", layers=3)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    holder = nn.Module()
    holder.model = wrapped
    parts = find_blocks(holder)
    assert parts.blocks_path == "model.base_model.model.model.layers"
    assert len(parts) == 3


def test_explicit_path_and_errors():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 4)
            self.trunk = nn.Linear(4, 4)

    model = Custom()
    with pytest.raises(ValueError, match="Could not locate the transformer blocks of Custom"):
        find_blocks(model)
    with pytest.raises(ValueError, match="is a Linear, expected an nn.ModuleList"):
        find_blocks(model, blocks_path="trunk")
    with pytest.raises(ValueError, match="does not exist on Custom"):
        find_blocks(model, blocks_path="trunk.missing")
    model.trunk = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="Could not locate"):  # "trunk" is no known name
        find_blocks(model)
    model.trunk = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    parts = find_blocks(model, blocks_path="trunk")
    assert len(parts) == 2 and parts.other == ["stem.weight", "stem.bias"]


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_model_names_its_own_blocks(arch):
    model = tiny_model(arch, layers=3)
    assert _block_path_from_model(model) == EXPECTED_PATH[arch]  # the model is asked before names are guessed
    base, _, name = EXPECTED_PATH[arch].rpartition(".")
    owner = _resolve(model, base)
    owner.trunk = getattr(owner, name)  # a block list under a name no guess knows
    delattr(owner, name)
    parts = find_blocks(model)
    assert parts.blocks_path == f"{base}.trunk" and len(parts) == 3
    assert parts.other == [], f"unclassified parameters: {parts.other}"


def test_timm_group_matcher_names_the_blocks():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=2)
    assert _block_path_from_model(vit) == "blocks"

    class Stacked(nn.Module):  # timm-style: group_matcher names the block list, whatever it is called
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])  # a decoy the name guess would take
            self.stack = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])

        def group_matcher(self, coarse=False):
            return {"stem": r"^layers", "blocks": [(r"^stack\.(\d+)", None)]}

    holder = nn.Module()
    holder.net = Stacked()
    parts = find_blocks(holder)
    assert parts.blocks_path == "net.stack" and len(parts) == 3


def _resolve(model, path):
    for attr in path.split("."):
        model = getattr(model, attr)
    return model
