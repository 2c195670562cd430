"""OwLore: outlier scores against a hand computation, weighted sampling, GaLore state of the sampled blocks."""

import json

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.core.galore import GaLoreAdamW
from callbacks.lisa import LISA, optimizer_state_bytes
from callbacks.owlore import OwLore
from tests.conftest import TinyModule, tiny_loader, trainer


class Chain(L.LightningModule):
    """Three blocks of two bias-free linears each, no non-linearity: the inputs are easy to compute by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 6, bias=False), nn.Linear(6, 8, bias=False))
                                    for _ in range(3))
        with torch.no_grad():  # planted outliers: block 1 gets two huge weights, block 2 one
            self.blocks[1][0].weight[0, 2] = 40.0
            self.blocks[1][1].weight[3, 5] = -35.0
            self.blocks[2][0].weight[4, 1] = 30.0

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return GaLoreAdamW(self.parameters(), lr=1e-3, rank=2)


def hand_scores(model: Chain, inputs: np.ndarray, m: float) -> list[float]:
    x, scores = inputs, []
    for block in model.blocks:
        entries = []
        for lin in block:
            w = lin.weight.detach().numpy().astype(np.float64)
            norms = np.sqrt((x**2).sum(axis=0))
            entries.append(np.abs(w) * norms[None, :])
            x = x @ w.T
        pooled = np.concatenate([e.ravel() for e in entries])
        scores.append(100.0 * np.count_nonzero(pooled > m * pooled.mean()) / pooled.size)
    return scores


def test_scores_match_hand_computation(tmp_path):
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(12, 8, generator=gen)
    model = Chain()
    owlore = OwLore(n_layers=1, interval=2, calibration_batches=2, outlier_threshold=3.0,
                    scores_file=str(tmp_path / "scores.json"))
    start = [[p.detach().clone() for p in b.parameters()] for b in model.blocks]
    expected = hand_scores(Chain(), data[:8].numpy().astype(np.float64), 3.0)  # 2 calibration batches of 4
    trainer([owlore], 1, tmp_path).fit(model, DataLoader(TensorDataset(data), batch_size=4))
    np.testing.assert_allclose(owlore.scores, expected, rtol=1e-5)
    assert expected[1] == max(expected) and expected[1] > 0 and expected[0] < expected[1]
    np.testing.assert_allclose(owlore.probabilities().numpy(), np.array(expected) / sum(expected), rtol=1e-5)
    assert json.loads((tmp_path / "scores.json").read_text())["scores"] == owlore.scores
    moved = {i for i, b in enumerate(model.blocks)
             if any(not torch.equal(p, s) for p, s in zip(b.parameters(), start[i], strict=True))}
    assert moved == set(owlore.active)


def test_sampling_follows_probabilities():
    owlore = OwLore(n_layers=1, scores=[1.0, 0.0, 3.0, 4.0], seed=0)
    counts = np.bincount([owlore.draw(4)[0] for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.125, 0.0, 0.375, 0.5], atol=0.03)
    two = OwLore(n_layers=3, scores=[1.0, 0.0, 0.0, 4.0])  # fewer positive scores than n_layers: still draws
    assert len(set(two.draw(4))) == 3


def test_galore_state_only_for_sampled_blocks_and_smaller_than_lisa(tmp_path):
    class Probe(L.Callback):
        def __init__(self, cb):
            self.cb, self.bytes = cb, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            opt = trainer.optimizers[0]
            trainable = self.cb.trainable_parameters()
            assert {id(p) for p in opt.state} == {id(p) for p in trainable}
            for p in self.cb.trainable_parameters():  # only the blocks' matrices are projected
                in_block = any(p is q for i in self.cb.active for q in self.cb._block_params[i])
                assert ("projector" in opt.state[p]) == (isinstance(opt, GaLoreAdamW) and in_block and p.ndim == 2)
            self.bytes.append(optimizer_state_bytes(opt))

    scores = [1.0, 2.0, 3.0, 4.0]
    owlore = OwLore(n_layers=2, interval=2, scores=scores, seed=0)
    lisa = LISA(n_layers=2, interval=2, seed=0)
    probe_o, probe_l = Probe(owlore), Probe(lisa)
    trainer([owlore, probe_o], 6, tmp_path / "owlore").fit(TinyModule(optimizer_cls=GaLoreAdamW, rank=4),
                                                           tiny_loader(batches=6))
    trainer([lisa, probe_l], 6, tmp_path / "lisa").fit(TinyModule(), tiny_loader(batches=6))
    assert max(probe_o.bytes) < min(probe_l.bytes)


def test_scores_file_is_reused_and_checked(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"scores": [0.5, 1.0, 2.0, 0.5]}))
    owlore = OwLore(n_layers=2, interval=5, scores_file=str(path), galore=False)
    owlore._calibrate = lambda *a: pytest.fail("calibration must not run when the cache exists")
    trainer([owlore], 1, tmp_path / "cached").fit(TinyModule(), tiny_loader(batches=1))
    assert owlore.scores == [0.5, 1.0, 2.0, 0.5]
    path.write_text(json.dumps({"scores": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="2 scores but the model has 4 blocks"):
        trainer([OwLore(n_layers=2, scores_file=str(path), galore=False)], 1, tmp_path / "checked").fit(
            TinyModule(), tiny_loader(batches=1))


def test_scores_survive_the_checkpoint():
    owlore = OwLore(n_layers=1, scores=[1.0, 2.0])
    owlore.draw(2)
    state = owlore.state_dict()
    other = OwLore(n_layers=1)
    other.load_state_dict(state)
    assert other.scores == [1.0, 2.0] and other.draw(2) == owlore.draw(2)


def test_needs_galore_optimizer(tmp_path):
    with pytest.raises(TypeError, match="callbacks.core.galore.GaLoreAdamW"):
        trainer([OwLore(n_layers=2, scores=[1, 1, 1, 1])], 1, tmp_path).fit(TinyModule(), tiny_loader(batches=1))
