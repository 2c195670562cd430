"""GRPO continues exactly where it stopped: the KL reference stays the run's initial policy, a run started from
``sft_checkpoint`` keeps the settings the user gave (so its own resume and validate commands accept them), and a
rollout batch always makes ``mu * num_mini_batches`` optimizer steps."""

import lightning as L
import pytest
import torch

from recipes.grpo import GRPOModule
from recipes.resume import check_resume
from tests.conftest import TINY_LM_CONFIG as TINY
from tests.conftest import grpo_data, grpo_module, write_sft_checkpoint


def _trainer(root, steps):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=root)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Initial(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = _weights(pl_module.model)


def test_kl_reference_after_resume_is_the_initial_policy_not_the_resumed_one(tmp_path):
    torch.manual_seed(0)
    first, seen = grpo_module(kl_coef=0.1), Initial()
    trainer = _trainer(tmp_path, 1)
    trainer.callbacks.append(seen)
    trainer.fit(first, datamodule=grpo_data(tmp_path))
    with torch.no_grad():  # the policy moved away from the initial one (whatever the rewards did)
        for p in first.model.parameters():
            p.add_(0.5)
    ckpt = tmp_path / "grpo.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = grpo_module(kl_coef=0.1)
    _trainer(tmp_path, 2).fit(resumed, datamodule=grpo_data(tmp_path), ckpt_path=ckpt)
    reference = resumed._reference[0].state_dict()
    for name, value in seen.state.items():
        assert torch.equal(reference[name], value), name


def test_a_run_from_sft_checkpoint_keeps_the_given_settings_and_passes_its_own_resume_rule(tmp_path):
    sft, _ = write_sft_checkpoint(tmp_path)
    given = {"sft_checkpoint": str(sft), "model_config": None, "num_generations": 2, "max_new_tokens": 4}
    m = GRPOModule(**given)
    trainer = _trainer(tmp_path, 1)
    trainer.fit(m, datamodule=grpo_data(tmp_path))
    assert m.hparams.model_config is None and m.architecture[1] == TINY
    ckpt_path = tmp_path / "grpo.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["hyper_parameters"]["model_config"] is None
    model = {"class_path": "recipes.grpo.GRPOModule", "init_args": given}
    assert check_resume(ckpt, str(ckpt_path), model, None) == []  # before: "checkpoint {...}, now None"

    sft.unlink()  # the architecture travels in the GRPO checkpoint
    loaded = GRPOModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    assert loaded.architecture[1] == TINY and loaded.hparams.model_config is None


@pytest.mark.parametrize("n,mu,chunks", [(6, 1, 4), (12, 2, 5), (8, 1, 4), (5, 3, 1)])
def test_a_rollout_batch_makes_mu_times_num_mini_batches_steps_covering_every_completion(n, mu, chunks):
    m = grpo_module(mu=mu, num_mini_batches=chunks)
    batches = list(m.mini_batches(n))
    assert len(batches) == mu * chunks == m.updates_per_rollout
    for p in range(mu):
        one_pass = torch.cat(batches[p * chunks:(p + 1) * chunks])
        assert sorted(one_pass.tolist()) == list(range(n))
        sizes = [len(b) for b in batches[p * chunks:(p + 1) * chunks]]
        assert max(sizes) - min(sizes) <= 1


def test_fewer_completions_than_mini_batches_is_refused_naming_the_settings():
    with pytest.raises(ValueError, match="num_mini_batches=4.*batch_size \\* num_generations"):
        list(grpo_module(num_mini_batches=4).mini_batches(3))


class Rollouts(L.Callback):
    """The completions of every rollout batch (GRPO's technique choice)."""

    def __init__(self):
        self.rows = []

    def on_fit_start(self, trainer, pl_module):
        real = pl_module.rollout

        def rollout(batch):
            out = real(batch)
            self.rows.append(out.completion.tolist())
            return out

        pl_module.rollout = rollout


def _grpo_fit(root, steps, ckpt_path=None):
    from callbacks.run.exact_resume import ExactResume
    from callbacks.run.periodic_checkpoint import PeriodicLastCheckpoint

    L.seed_everything(5)
    module = grpo_module(kl_coef=0.1, mu=2, num_mini_batches=2, temperature=2.0,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    rollouts = Rollouts()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root, callbacks=[ExactResume(), PeriodicLastCheckpoint(), rollouts])
    trainer.fit(module, datamodule=grpo_data(root.parent), ckpt_path=ckpt_path)
    return module, rollouts.rows, root / "checkpoints" / "last.ckpt"


def test_a_finished_grpo_run_continues_exactly_rollouts_reference_and_weights(tmp_path):
    full, full_rows, _ = _grpo_fit(tmp_path / "full", 8)  # 2 rollout batches of mu * num_mini_batches = 4 steps
    _, first_rows, last = _grpo_fit(tmp_path / "cut", 4)
    resumed, resumed_rows, _ = _grpo_fit(tmp_path / "resumed", 8, ckpt_path=last)
    assert first_rows + resumed_rows == full_rows
    for name, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    for name, value in full._reference[0].state_dict().items():
        assert torch.equal(resumed._reference[0].state_dict()[name], value), name
