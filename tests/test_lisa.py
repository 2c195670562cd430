"""LISA: which weights move, what the optimizer holds, resume, gradient checkpointing and two-rank DDP."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.core.block_switching import BlockSwitching
from callbacks.core.blocks import find_blocks
from callbacks.lisa import LISA
from tests.conftest import LAYERWISE_ARCHS, IntervalProbe, TinyModule, moved_blocks, snapshot, tiny_loader, trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch", LAYERWISE_ARCHS)
def test_only_sampled_blocks_train_and_state_is_bounded(tmp_path, arch):
    lisa = LISA(n_layers=2, interval=3, seed=1)
    probe = IntervalProbe(lisa)
    module = TinyModule(arch, layers=6)
    trainer([lisa, probe], 24, tmp_path).fit(module, tiny_loader(arch, batches=24))
    rows = probe.rows
    assert len(rows) == 24
    for step, row in enumerate(rows):
        assert len(row["active"]) == 2
        assert row["moved"] == set(row["active"]), f"step {step}: moved {row['moved']} active {row['active']}"
        assert row["always_on_moved"]
        # the optimizer holds state for exactly the trainable-now parameters: 2 fp32 moments + a step scalar each
        assert row["state_ids"] == row["trainable_ids"]
        assert row["state_bytes"] == 8 * row["trainable_numel"] + 4 * row["n_tensors"]
    sets = [tuple(rows[s]["active"]) for s in range(0, 24, 3)]
    for start in range(0, 24, 3):  # constant inside an interval
        assert all(rows[s]["active"] == rows[start]["active"] for s in range(start, start + 3))
    assert len(set(sets)) > 2, f"the active set never changed: {sets}"
    assert max(r["state_bytes"] for r in rows) == rows[0]["state_bytes"]  # does not grow with switches


def test_resampled_block_starts_with_fresh_moments(tmp_path):
    torch.manual_seed(0)
    lisa = LISA(n_layers=1, interval=1, seed=0, weights=[1.0, 1.0])
    seen = []

    class StepCount(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            block = lisa._block_params[lisa.active[0]][0]
            seen.append((lisa.active[0], int(trainer.optimizers[0].state[block]["step"])))

    trainer([lisa, StepCount()], 12, tmp_path).fit(TinyModule(layers=2), tiny_loader(batches=12))
    for (prev_block, prev_steps), (block, steps) in zip(seen, seen[1:], strict=False):
        assert steps == (prev_steps + 1 if block == prev_block else 1)
    assert any(s == 1 for _, s in seen[1:]) and any(s > 1 for _, s in seen)


@pytest.mark.parametrize("arch", LAYERWISE_ARCHS)
def test_frozen_always_on_parts_and_no_double_draw_at_start(tmp_path, arch):
    lisa = LISA(n_layers=1, interval=100, train_embedding=False, train_head=False, seed=0)
    draws = []
    original = lisa.draw
    lisa.draw = lambda n: draws.append(n) or original(n)
    module = TinyModule(arch)
    parts = find_blocks(module)
    before = snapshot(module)
    trainer([lisa], 3, tmp_path).fit(module, tiny_loader(arch, batches=3))
    after = dict(module.named_parameters())
    assert len(draws) == 1
    assert parts.embedding and parts.final_norm
    for name in [*parts.embedding, *parts.head]:
        assert torch.equal(after[name], before[name]), name
    for name in parts.final_norm:
        assert not torch.equal(after[name], before[name]), name
    assert moved_blocks(module, before) == set(lisa.active)
    assert all(p.requires_grad for p in module.parameters())  # the model is handed back unfrozen


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_gradient_checkpointing_with_frozen_embedding(tmp_path, mode):
    lisa = LISA(n_layers=2, interval=100, train_embedding=False, seed=2)
    module = TinyModule(checkpointing=mode)
    before = snapshot(module)
    trainer([lisa], 2, tmp_path).fit(module, tiny_loader(batches=2))
    assert moved_blocks(module, before) == set(lisa.active)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # resumes from the full run's checkpoint on purpose
def test_resume_mid_interval_matches_uninterrupted(tmp_path):
    # one batch per epoch: Lightning restarts a non-stateful loader's epoch on resume, which is not LISA's concern
    def run(root, ckpt=None):
        lisa = LISA(n_layers=2, interval=4, seed=5)
        module = TinyModule(layers=5)
        saver = ModelCheckpoint(dirpath=root, every_n_train_steps=6, save_top_k=-1)
        trainer([lisa, saver], 12, root, enable_checkpointing=True).fit(module, tiny_loader(batches=1),
                                                                       ckpt_path=ckpt)
        return module, lisa

    full, full_lisa = run(tmp_path / "full")
    ckpt = next((tmp_path / "full").glob("*step=6.ckpt"))  # mid-way through the second interval
    assert torch.load(ckpt, weights_only=False)["callbacks"]["LISA"]["sampled_at"] == 4
    resumed, resumed_lisa = run(tmp_path / "resumed", ckpt)
    assert resumed_lisa.active == full_lisa.active
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_policy_only_says_which_blocks_train_next(tmp_path):
    class SecondThenFirst(BlockSwitching):  # the mechanism comes from BlockSwitching; this is the whole policy
        def draw(self, num_blocks):
            return [1] if self.sampled_at < 0 else [0]

    policy = SecondThenFirst(n_layers=1, interval=2, train_embedding=False, train_head=False, train_norm=False,
                             train_other=False)
    probe = IntervalProbe(policy)
    trainer([policy, probe], 4, tmp_path).fit(TinyModule(layers=3), tiny_loader(batches=4))
    assert [row["moved"] for row in probe.rows] == [{1}, {1}, {0}, {0}]
    assert all(row["state_ids"] == row["trainable_ids"] for row in probe.rows)  # block 1's state was released
    with pytest.raises(NotImplementedError, match="override draw"):
        BlockSwitching(n_layers=1, interval=1).draw(3)


def test_argument_checks():
    with pytest.raises(ValueError, match="n_layers"):
        LISA(n_layers=0)
    with pytest.raises(ValueError, match="interval"):
        LISA(interval=0)


def test_too_many_layers_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="n_layers=5 but the model has only 4 blocks"):
        trainer([LISA(n_layers=5)], 1, tmp_path).fit(TinyModule(), tiny_loader(batches=1))


@pytest.mark.slow
def test_two_rank_plain_ddp_keeps_weights_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    subprocess.run([sys.executable, str(ROOT / "tests" / "lisa_ddp_worker.py"), str(tmp_path)], check=True,
                   env=env, cwd=tmp_path, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["find_unused"] is r1["find_unused"] is True  # plain strategy="ddp": LISA switched it on itself
    assert r0["history"] == r1["history"]
    assert len({tuple(a) for a in r0["history"]}) > 1
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]), name
    start = TinyModule().model.state_dict()
    assert any(not torch.equal(w, start[n]) for n, w in r0["weights"].items() if ".layers." in n)
