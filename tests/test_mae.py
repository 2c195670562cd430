"""MAE pre-training: masking, loss, encoder on visible tokens, fixed position embeddings, export into timm."""

from types import SimpleNamespace

import pytest
import timm
import torch

from recipes.mae_pretrain import MAEPretrainModule
from recipes.parts.mae_masking import masked_mse, num_kept, patchify, random_masking, sincos_pos_embed_2d, unpatchify
from tests.conftest import TINY_VIT_KWARGS as TINY


def tiny_mae(**kwargs) -> MAEPretrainModule:
    torch.manual_seed(0)
    args = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "in_chans": 1, "model_kwargs": TINY,
            "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, **kwargs}
    return MAEPretrainModule(**args)


@pytest.mark.parametrize("length,ratio,keep", [(16, 0.75, 4), (196, 0.9, 19), (10, 0.9, 1), (50, 0.5, 25)])
def test_masking_keeps_exactly_the_configured_count(length, ratio, keep):
    x = torch.randn(3, length, 4)
    visible, mask, _ = random_masking(x, ratio, generator=torch.Generator().manual_seed(0))
    assert num_kept(length, ratio) == keep
    assert visible.shape == (3, keep, 4)
    assert mask.sum(1).tolist() == [length - keep] * 3
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_ids_restore_inverts_the_shuffle_and_visible_tokens_are_the_lowest_noise():
    x = torch.randn(2, 12, 3)
    noise = torch.rand(2, 12)
    visible, mask, ids_restore = random_masking(x, 0.75, noise=noise)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(12).expand(2, -1))
    for n in range(2):
        kept = torch.argsort(noise[n])[:3]
        assert torch.equal(visible[n], x[n, kept])
        assert torch.equal(mask[n] == 0, torch.isin(torch.arange(12), kept))
    # Putting the visible tokens back with ids_restore (mask tokens = 0) restores them in place.
    tokens = torch.cat([visible, torch.zeros(2, 9, 3)], dim=1)
    restored = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 3))
    assert torch.equal(restored[mask == 0], x[mask == 0])
    assert torch.all(restored[mask == 1] == 0)


def test_loss_covers_masked_patches_only():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.float32)
    expected = sum(float(((pred[n, i] - target[n, i]) ** 2).mean()) for n in range(2) for i in range(6)
                   if mask[n, i]) / 6
    assert masked_mse(pred, target, mask).item() == pytest.approx(expected, rel=1e-6)
    changed = pred.clone()
    changed[mask == 0] += 100.0  # visible-patch predictions do not count
    assert masked_mse(changed, target, mask).item() == pytest.approx(expected, rel=1e-6)
    norm_target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected_norm = float((((pred - norm_target) ** 2).mean(-1) * mask).sum() / mask.sum())
    assert masked_mse(pred, target, mask, norm_pix=True).item() == pytest.approx(expected_norm, rel=1e-6)


def test_patchify_unpatchify_round_trip_and_layout():
    imgs = torch.randn(2, 3, 16, 24)
    patches = patchify(imgs, 8)
    assert patches.shape == (2, 6, 8 * 8 * 3)
    # Patch 4 is row 1, column 1; pixels are laid out (p, p, C).
    assert torch.equal(patches[:, 4], imgs[:, :, 8:16, 8:16].permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(unpatchify(patches, 8, (2, 3), 3), imgs)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.randn(1, 1, 10, 16), 8)


def test_sincos_embedding_values():
    emb = sincos_pos_embed_2d(8, (2, 3), num_prefix=1)
    assert emb.shape == (7, 8)
    assert torch.all(emb[0] == 0)
    # Patch (row 1, col 2): first half encodes the column, second half the row; omega = [1, 1/100].
    col, row = 2.0, 1.0
    expected = [torch.sin(torch.tensor(col)), torch.sin(torch.tensor(col / 100)), torch.cos(torch.tensor(col)),
                torch.cos(torch.tensor(col / 100)), torch.sin(torch.tensor(row)), torch.sin(torch.tensor(row / 100)),
                torch.cos(torch.tensor(row)), torch.cos(torch.tensor(row / 100))]
    assert torch.allclose(emb[1 + 1 * 3 + 2], torch.stack(expected), atol=1e-6)


def test_encoder_sees_only_visible_tokens():
    model = tiny_mae()
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    loss, pred, mask = model(torch.randn(3, 1, 32, 32))
    keep = num_kept(16, 0.9)
    assert seen == [torch.Size([3, 1 + keep, 32])]  # class token + visible patches
    assert pred.shape == (3, 16, 64) and mask.sum().item() == 3 * (16 - keep)
    loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_unmasked_encoder_matches_timm_forward_features():
    model = tiny_mae()
    imgs = torch.randn(2, 1, 32, 32)
    latent, _, _ = model.forward_encoder(imgs, 0.0, noise=torch.arange(16.0).expand(2, -1))
    assert torch.allclose(latent, model.encoder.forward_features(imgs), atol=1e-5)


def test_position_embeddings_are_fixed_sincos_and_not_optimized():
    model = tiny_mae()
    expected = sincos_pos_embed_2d(32, (4, 4), num_prefix=1)
    assert torch.equal(model.encoder.pos_embed[0], expected)
    assert not model.encoder.pos_embed.requires_grad
    model._trainer = SimpleNamespace(world_size=2, accumulate_grad_batches=3, datamodule=SimpleNamespace(batch_size=8),
                                     estimated_stepping_batches=100)
    optimizer = model.configure_optimizers()["optimizer"]
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.encoder.pos_embed) not in held and id(model.mask_token) in held
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    # lr = 1.5e-4 * (8 * 2 * 3) / 256, weight decay on matrices only.
    assert optimizer.defaults["lr"] == pytest.approx(1.5e-4 * 48 / 256)
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay == {"decay": 0.05, "no_decay": 0.0}
    no_decay = next(g for g in optimizer.param_groups if g["name"] == "no_decay")["params"]
    assert all(p.ndim == 1 or p is model.encoder.cls_token for p in no_decay)


def test_exported_encoder_loads_into_timm_strictly(tmp_path):
    model = tiny_mae()
    path = model.export_encoder_to(tmp_path / "encoder.pth")
    kwargs = model.encoder_create_kwargs()
    loaded = timm.create_model("vit_tiny_patch16_224", pretrained=False, checkpoint_path=str(path), **kwargs)
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    fresh.load_state_dict(torch.load(path), strict=True)
    assert (tmp_path / "encoder.json").is_file()
