"""ProgressiveLayerDrop: schedule, draw statistics, skipped compute, exact outputs, resume and DDP sync."""

import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from callbacks import ProgressiveLayerDrop
from callbacks.core.blocks import find_blocks
from recipes.parts.hf_model import enable_activation_checkpointing
from tests.conftest import LAYERWISE_ARCHS, VOCAB, TinyModule, model_inputs, tiny_model


def output(model: nn.Module, arch: str, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if arch == "vit" else out.logits


def test_schedule_matches_closed_form():
    pld = ProgressiveLayerDrop(theta_bar=0.5, gamma=0.01)
    for t in (0, 1, 10, 100, 1000):
        assert pld.theta(t) == pytest.approx(0.5 * math.exp(-0.01 * t) + 0.5, abs=1e-15)
    assert pld.theta(0) == 1.0
    # p_l = 1 - (l / L)(1 - theta) at t = 100: theta = 0.5 + 0.5 e^-1
    theta = 0.5 + 0.5 * math.exp(-1.0)
    assert pld.keep_probabilities(100, 4) == pytest.approx([1 - d / 4 * (1 - theta) for d in (1, 2, 3, 4)])
    assert pld.keep_probabilities(10**6, 4) == pytest.approx([0.875, 0.75, 0.625, 0.5])
    warm = ProgressiveLayerDrop(theta_bar=0.5, gamma=0.01, warmup_steps=20, keep_first=True, keep_last=True)
    assert warm.theta(19) == 1.0 and warm.theta(20) == 1.0
    assert warm.theta(120) == pytest.approx(theta)
    assert warm.keep_probabilities(10**6, 4) == pytest.approx([1.0, 0.75, 0.625, 1.0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="theta_bar must be in"):
        ProgressiveLayerDrop(theta_bar=0.0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        ProgressiveLayerDrop(gamma=-1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        ProgressiveLayerDrop(warmup_steps=-1)


def test_keep_frequency_matches_p_l():
    # theta_bar = 0.2 at a late step: p_l = 0.9, 0.8, ..., 0.2 (0.1 apart, ~30 sigma at n = 20000), so a wrong or
    # p shifted by one block fails; 5 sigma tolerance does not fail by chance.
    pld = ProgressiveLayerDrop(theta_bar=0.2, gamma=1.0, seed=123)
    n, blocks = 20000, 8
    counts = torch.zeros(blocks)
    for _ in range(n):
        counts += torch.tensor(pld.sample(10**4, blocks), dtype=torch.float)
    expected = torch.tensor([1 - d / 8 * 0.8 for d in range(1, 9)])
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() < 5 * sigma).all(), (counts / n, expected)


def _call_counter(blocks: nn.ModuleList, sub: str) -> list[int]:
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        getattr(block, sub).register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def _draw_with_drops(pld: ProgressiveLayerDrop, blocks: int) -> list[bool]:
    """Sample until at least one block is dropped and one kept (fixed seed, so deterministic)."""
    while True:
        keep = pld.sample(10**6, blocks)
        if 0 < sum(keep) < blocks:
            return keep


@pytest.mark.parametrize("arch", LAYERWISE_ARCHS)
def test_dropped_block_is_not_run_and_gets_no_grad(arch):
    model = tiny_model(arch, layers=6).train()
    pld = ProgressiveLayerDrop(theta_bar=0.3, seed=1)
    pld.install(model)
    parts = find_blocks(model)
    calls = _call_counter(parts.blocks, "mlp")
    keep = _draw_with_drops(pld, 6)
    output(model, arch, model_inputs(arch)).square().mean().backward()
    assert calls == [int(k) for k in keep]
    for block, kept in zip(parts.blocks, keep, strict=True):
        grads = [p.grad for p in block.parameters()]
        assert all(g is not None for g in grads) if kept else all(g is None for g in grads)
    named = dict(model.named_parameters())
    assert all(named[n].grad is not None for n in parts.embedding)


def test_gradient_checkpointing_recomputes_with_the_same_draw():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama", layers=6).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        pld = ProgressiveLayerDrop(theta_bar=0.3, seed=1)
        pld.install(model)
        _draw_with_drops(pld, 6)
        ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert (g is None) == (grads[1][name] is None), name
        if g is not None:
            torch.testing.assert_close(g, grads[1][name], msg=name)


def test_vit_output_equals_hand_computation():
    """Kept blocks give x + (block(x) - x) / p_l, dropped blocks give x, with the same p_l as the draw."""
    model = tiny_model("vit").train()
    images = torch.randn(2, 3, 32, 32)
    plain_blocks = [type(b).forward.__get__(b) for b in model.blocks]
    pld = ProgressiveLayerDrop(theta_bar=0.4, seed=3)
    pld.install(model)
    keep = _draw_with_drops(pld, 4)
    out = model.forward_features(images)
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    for block, kept, p in zip(plain_blocks, keep, pld.probs, strict=True):
        if kept:
            x = x + (block(x) - x) / p
    torch.testing.assert_close(out, model.norm(x), rtol=1e-6, atol=1e-6)  # the callback fuses it into one lerp
    assert len(set(pld.probs)) == 4  # the check above would catch a p taken from the wrong block


@pytest.mark.parametrize("arch", LAYERWISE_ARCHS)
def test_everything_kept_equals_plain_model_and_eval_is_unchanged(arch):
    plain, wrapped = tiny_model(arch), tiny_model(arch)
    inputs = model_inputs(arch)
    expected = output(plain.train(), arch, inputs)
    pld = ProgressiveLayerDrop(theta_bar=1.0)
    pld.install(wrapped.train())
    pld.sample(500, 4)
    torch.testing.assert_close(output(wrapped, arch, inputs), expected, rtol=0, atol=0)
    # eval runs every block unscaled, even with a draw that drops blocks pending
    dropping = ProgressiveLayerDrop(theta_bar=0.5, seed=0)
    dropping.install(plain)
    _draw_with_drops(dropping, 4)
    plain.eval()
    wrapped.eval()
    torch.testing.assert_close(output(plain, arch, inputs), output(wrapped, arch, inputs), rtol=0, atol=0)


def test_remove_restores_forward_and_state_dict_keys():
    model = tiny_model("llama")
    keys = list(model.state_dict())
    pld = ProgressiveLayerDrop()
    pld.install(model)
    assert all("forward" in b.__dict__ for b in model.model.layers)
    assert list(model.state_dict()) == keys
    pld.remove()
    assert all("forward" not in b.__dict__ for b in model.model.layers)


class TupleBlock(nn.Module):
    """A Pre-LN block returning a tuple, as older Hugging Face decoder layers do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, hidden_states, scale=1.0):
        return (hidden_states + scale * self.lin(hidden_states), None)


def test_tuple_returning_blocks():
    holder = nn.Module()
    holder.trunk = nn.ModuleList([TupleBlock() for _ in range(3)])
    pld = ProgressiveLayerDrop(theta_bar=0.3, seed=5, blocks_path="trunk")
    pld.install(holder)
    keep = _draw_with_drops(pld, 3)
    x = torch.randn(2, 4)
    for i, block in enumerate(holder.trunk):
        out = block(x, scale=2.0)
        assert isinstance(out, tuple) and len(out) == 2 and out[1] is None
        ref = x if not keep[i] else x + (x + 2.0 * block.lin(x) - x) / pld.probs[i]
        torch.testing.assert_close(out[0], ref)


def _loader(n: int = 2) -> torch.utils.data.DataLoader:
    ids = torch.randint(0, VOCAB, (n, 8), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)


def _fit(tmp: Path, max_steps: int, ckpt_path=None, pld=None, logger=False):
    """Train a tiny Llama with SGD on one batch per epoch (resuming at any step sees the same data)."""
    module = TinyModule(optimizer_cls=torch.optim.SGD, lr=0.1)
    pld = pld or ProgressiveLayerDrop(theta_bar=0.5, gamma=0.5, seed=7)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[pld],
                        default_root_dir=tmp, log_every_n_steps=1)
    trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return module, pld, trainer


def test_resume_restores_schedule_and_draws(tmp_path):
    full, _, _ = _fit(tmp_path / "full", 6)
    _, first, trainer = _fit(tmp_path / "a", 3)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed, pld, _ = _fit(tmp_path / "b", 6, ckpt_path=ckpt)
    assert pld.step == 5 and first.step == 2
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert all("forward" not in b.__dict__ for b in resumed.model.model.layers)  # teardown restored the blocks


def test_logs_theta_and_fraction_computed(tmp_path):
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    _, pld, trainer = _fit(tmp_path, 4, logger=logger)
    metrics = trainer.logged_metrics
    assert float(metrics["pld/theta"]) == pytest.approx(0.5 * math.exp(-0.5 * 3) + 0.5)
    assert float(metrics["pld/fraction_computed"]) in {k / 4 for k in range(5)}
    header = next(Path(logger.log_dir).glob("metrics.csv")).read_text().splitlines()[0]
    assert "pld/theta" in header and "pld/fraction_computed" in header


@pytest.mark.slow
def test_two_rank_plain_ddp_stays_in_sync(tmp_path):
    worker = Path(__file__).with_name("pld_ddp_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["find_unused"] is r1["find_unused"] is True  # plain DDPStrategy: the callback switched it on itself
    assert r0["masks"] == r1["masks"] and len(r0["masks"]) == 6
    assert any(not all(m) for m in r0["masks"]), "no block was ever dropped: the test would prove nothing"
    for name, w in r0["weights"].items():
        torch.testing.assert_close(w, r1["weights"][name], rtol=0, atol=0, msg=name)
