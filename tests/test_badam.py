"""BAdam: one block trains at a time in the chosen order, the optimizer holds only its state, exact resume."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import BAdam
from callbacks.lisa import optimizer_state_bytes
from tests.conftest import TinyModule, moved_blocks, snapshot, tiny_loader, trainer

OUTSIDE = ("embed_tokens.weight", "lm_head.weight", "model.norm.weight")


class StepProbe(L.Callback):
    """Per optimizer step: the active block, which blocks and outside parts moved, and the optimizer's state."""

    def __init__(self, badam: BAdam):
        self.badam, self.rows = badam, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        block = self.badam._block_params[self.badam.active[0]]
        self.rows.append({
            "active": list(self.badam.active), "moved": moved_blocks(pl_module, self.before),
            "outside_moved": {n.split(".")[-2] for n, p in pl_module.named_parameters()
                              if n.endswith(OUTSIDE) and not torch.equal(p, self.before[n])},
            "state_ids": {id(p) for p in opt.state}, "block_ids": {id(p) for p in block},
            "state_bytes": optimizer_state_bytes(opt), "block_numel": sum(p.numel() for p in block),
            "n_tensors": len(block), "adam_step": int(opt.state[block[0]]["step"])})


@pytest.mark.parametrize("order, visits", [
    ("ascending", [0, 1, 2, 3, 0, 1]),
    ("descending", [3, 2, 1, 0, 3, 2]),
    ([2, 0], [2, 0, 2, 0, 2, 0]),
])
def test_one_block_in_order_and_state_only_for_it(tmp_path, order, visits):
    badam = BAdam(interval=2, order=order)
    probe = StepProbe(badam)
    module = TinyModule(layers=4)
    trainer([badam, probe], 12, tmp_path).fit(module, tiny_loader(batches=12))
    rows = probe.rows
    assert [r["active"][0] for r in rows] == [b for b in visits for _ in range(2)]
    for step, row in enumerate(rows):
        assert row["moved"] == set(row["active"]), f"step {step}: moved {row['moved']} active {row['active']}"
        assert row["outside_moved"] == set()  # no always-on embedding, head or norm
        assert row["state_ids"] == row["block_ids"]
        assert row["state_bytes"] == 8 * row["block_numel"] + 4 * row["n_tensors"]
        assert row["adam_step"] == step % 2 + 1  # fresh moments at every visit
    assert all(p.requires_grad for p in module.parameters())  # handed back unfrozen


def test_random_order_is_a_permutation_per_pass(tmp_path):
    badam = BAdam(interval=1, order="random", seed=4)
    probe = StepProbe(badam)
    trainer([badam, probe], 20, tmp_path).fit(TinyModule(layers=5), tiny_loader(batches=20))
    visits = [r["active"][0] for r in probe.rows]
    passes = [visits[i:i + 5] for i in range(0, 20, 5)]
    assert all(sorted(p) == list(range(5)) for p in passes), passes
    assert len({tuple(p) for p in passes}) > 1, f"every pass had the same order: {passes}"
    assert all(r["moved"] == set(r["active"]) and r["state_ids"] == r["block_ids"] for r in probe.rows)


def test_always_on_parts_on_request(tmp_path):
    badam = BAdam(interval=3, train_head=True, train_norm=True)
    probe = StepProbe(badam)
    trainer([badam, probe], 3, tmp_path).fit(TinyModule(layers=3), tiny_loader(batches=3))
    assert all(r["outside_moved"] == {"lm_head", "norm"} and r["moved"] == {2} for r in probe.rows)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # resumes from the full run's checkpoint on purpose
def test_resume_mid_pass_matches_uninterrupted(tmp_path):
    def run(root, ckpt=None):
        badam = BAdam(interval=2, order="random", seed=7)
        module = TinyModule(layers=3)
        saver = ModelCheckpoint(dirpath=root, every_n_train_steps=5, save_top_k=-1)
        trainer([badam, saver], 14, root, enable_checkpointing=True).fit(module, tiny_loader(batches=1),
                                                                        ckpt_path=ckpt)
        return module, badam

    full, full_badam = run(tmp_path / "full")
    ckpt = next((tmp_path / "full").glob("*step=5.ckpt"))  # mid-interval, mid-way through the first pass
    state = torch.load(ckpt, weights_only=False)["callbacks"]["BAdam"]
    assert state["position"] == 3 and state["sampled_at"] == 4
    resumed, resumed_badam = run(tmp_path / "resumed", ckpt)
    assert resumed_badam.state_dict()["pass_order"] == full_badam.state_dict()["pass_order"]
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="order must be one of"):
        BAdam(order="sideways")
    with pytest.raises(ValueError, match="block indices"):
        BAdam(order=[0, -1])
    with pytest.raises(ValueError, match="interval"):
        BAdam(interval=0)
    with pytest.raises(ValueError, match="order lists block 4 but the model has only 4 blocks"):
        trainer([BAdam(order=[0, 4])], 1, tmp_path).fit(TinyModule(), tiny_loader(batches=1))


def test_a_block_drawn_again_across_a_pass_boundary_starts_with_fresh_moments(tmp_path):
    badam = BAdam(interval=1, order="random", seed=0)
    probe = StepProbe(badam)
    trainer([badam, probe], 8, tmp_path).fit(TinyModule(layers=2), tiny_loader(batches=8))
    visits = [r["active"][0] for r in probe.rows]
    assert any(a == b for a, b in zip(visits[:-1], visits[1:], strict=True)), visits  # the same block twice in a row
    assert [r["adam_step"] for r in probe.rows] == [1] * 8  # one step per visit, each from zero moments
