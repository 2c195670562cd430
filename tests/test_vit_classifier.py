"""ViT fine-tuning: layer-decay groups, checkpoint loading, masked BCE, AUROC with undefined labels."""

import csv

import pytest
import torch

from recipes.mae_pretrain import MAEPretrainModule
from recipes.parts.auroc import MaskedMultilabelAUROC, write_auroc_table
from recipes.parts.optim import layer_decay_groups
from recipes.vit_classifier import ViTClassifierModule
from tests.conftest import TINY_VIT_KWARGS as TINY

LABELS = ["a", "b", "c"]


def classifier(**kwargs) -> ViTClassifierModule:
    torch.manual_seed(0)
    args = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "model_kwargs": TINY, "label_names": LABELS, **kwargs}
    return ViTClassifierModule(**args)


def expected_layer(name: str) -> int:
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    assert name.startswith(("fc_norm.", "head.")), name
    return 4


def test_layer_decay_groups_scale_every_parameter():
    """timm's param_groups_layer_decay gives MAE's lr_decay.py groups, parameter by parameter (average pooling)."""
    model = classifier().model
    groups = layer_decay_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.55)
    group_of = {id(p): g for g in groups for p in g["params"]}
    assert len(group_of) == sum(len(g["params"]) for g in groups)  # no parameter in two groups
    seen = {}
    for name, param in model.named_parameters():
        group = group_of[id(param)]
        seen[name] = group
        layer = expected_layer(name)
        assert group["lr_scale"] == pytest.approx(0.55 ** (4 - layer))
        assert group["lr"] == pytest.approx(1e-3 * 0.55 ** (4 - layer))
        no_decay = param.ndim == 1 or name in ("cls_token", "pos_embed")
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
        assert group["name"] == f"layer_{layer}_{'no_decay' if no_decay else 'decay'}", name
    assert set(seen) == {n for n, _ in model.named_parameters()}
    assert seen["head.weight"]["lr_scale"] == 1.0 and seen["patch_embed.proj.weight"]["lr_scale"] == 0.55 ** 4


def test_token_pooling_puts_the_final_norm_with_the_last_block():
    """The one place timm's layer ids differ from MAE's rule (documented in layer_decay_groups)."""
    model = classifier(global_pool="token").model
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert scale["norm.weight"] == scale["blocks.2.norm1.weight"] == 0.5 and scale["head.weight"] == 1.0


def test_loads_mae_encoder_and_rejects_a_mismatched_one(tmp_path):
    mae = MAEPretrainModule(model_name="vit_tiny_patch16_224", img_size=32, model_kwargs=TINY, decoder_dim=16,
                            decoder_depth=1, decoder_heads=2)
    path = mae.export_encoder_to(tmp_path / "encoder.pth")
    model = classifier(init_from=str(path)).model
    for name, tensor in mae.encoder.state_dict().items():
        if not name.startswith("norm."):
            assert torch.equal(model.state_dict()[name], tensor), name
    # The Lightning checkpoint form (encoder.* keys, decoder dropped) loads the same weights.
    torch.save({"state_dict": mae.state_dict()}, tmp_path / "mae.ckpt")
    again = classifier(init_from=str(tmp_path / "mae.ckpt")).model
    assert torch.equal(again.blocks[2].mlp.fc1.weight, mae.encoder.blocks[2].mlp.fc1.weight)
    deeper = MAEPretrainModule(model_name="vit_tiny_patch16_224", img_size=32, model_kwargs={**TINY, "depth": 4},
                               decoder_dim=16, decoder_depth=1, decoder_heads=2)
    deeper.export_encoder_to(tmp_path / "deep.pth")
    with pytest.raises(ValueError, match=r"unexpected \['blocks.3"):
        classifier(init_from=str(tmp_path / "deep.pth"))


def test_loss_ignores_masked_entries():
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    labels = torch.tensor([[1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = (bce(logits[0, 0], labels[0, 0]) + bce(logits[0, 1], labels[0, 1]) + bce(logits[1, 1], labels[1, 1])
                + bce(logits[1, 2], labels[1, 2])) / 4
    assert ViTClassifierModule.loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_auroc_undefined_labels_are_left_out_of_the_mean(tmp_path):
    metric = MaskedMultilabelAUROC(3)
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.6], [0.6, 0.4, 0.2], [0.1, 0.3, 0.9]])
    target = torch.tensor([[1, 0, 0], [0, 1, 0], [0, -1, 0], [1, 0, 0]])
    metric.update(scores[:2], target[:2])
    metric.update(scores[2:], target[2:])
    macro, per_label, positives, negatives = metric.compute()
    # Label a: positives {0.9, 0.1}, negatives {0.2, 0.6}: 2 of 4 pairs ordered -> 0.5. Label b: the ignored
    # entry dropped, positive 0.8 above both negatives -> 1.0. Label c has no positives -> undefined.
    assert per_label[0] == pytest.approx(0.5) and per_label[1] == pytest.approx(1.0) and per_label[2] is None
    assert macro == pytest.approx(0.75)
    assert positives == [2, 1, 0] and negatives == [2, 2, 4]
    csv_path, png_path = write_auroc_table(tmp_path / "test_auroc", LABELS, per_label, positives, negatives, macro)
    rows = list(csv.reader(csv_path.open()))
    assert rows[3] == ["c", "undefined", "0", "4"] and rows[4][:2] == ["macro", "0.7500"]
    assert png_path.stat().st_size > 0


def test_the_same_undefined_auroc_labels_warn_once_per_stage():
    module = ViTClassifierModule.__new__(ViTClassifierModule)
    with pytest.warns(UserWarning, match="AUROC undefined") as record:
        for undefined in (["Hernia"], ["Hernia"], ["Hernia"], ["Hernia", "Edema"], ["Hernia", "Edema"]):
            module.warn_undefined("val", undefined)
        module.warn_undefined("test", ["Hernia"])
    assert [str(w.message).split(" for ")[1].split(";")[0] for w in record] == \
        ["['Hernia']", "['Hernia', 'Edema']", "['Hernia']"]
