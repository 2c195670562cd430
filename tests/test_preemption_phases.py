"""A signal before a fit's first training step (the sanity check, GRPO's SFT warm-up, LISA's importance measurement,
OwLore's calibration) stops that phase after its current unit and raises ``Preempted`` (exit status 128 + signal)
with nothing saved, instead of killing the process at once or exiting 0; the signal handlers from before the fit
are back afterwards."""

import os
import signal

import lightning as L
import pytest

from callbacks import LISA, OwLore
from callbacks.run.preemption import Preempted, PreemptionCheckpoint
from datamodules.instruction import InstructionDataModule
from recipes.causal_lm import CausalLMModule
from tests.conftest import TINY_LM_CONFIG, fake_slurm_job, grpo_data, grpo_module


class Killed(Exception):
    """What the default SIGTERM action would do (the process dies), as an exception the test can see."""


@pytest.fixture
def fatal_sigterm():
    def die(signum, frame):
        raise Killed

    previous = signal.signal(signal.SIGTERM, die)
    yield die
    signal.signal(signal.SIGTERM, previous)


class SigtermOnForward(L.Callback):
    """Counts the model's forward passes from fit start on and sends SIGTERM to this process at pass ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def on_fit_start(self, trainer, pl_module):
        pl_module.model.get_input_embeddings().register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermInSanityCheck(L.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        assert trainer.sanity_checking
        self.batches += 1
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def _lm_fit(root, callbacks, sanity_steps=0, preemption=None):
    data = InstructionDataModule(synthetic_dir=str(root / "syn"), synthetic_train_size=24, batch_size=2, seed=1)
    module = CausalLMModule(model_config=TINY_LM_CONFIG, exact_match_batches=0)
    callbacks = [*callbacks, preemption or PreemptionCheckpoint()]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=3, num_sanity_val_steps=sanity_steps,
                        default_root_dir=root)
    trainer.fit(module, datamodule=data)


def _assert_stopped_before_training(info, phase, root, handler):
    assert info.value.code == 143 and info.value.path is None and info.value.step == 0
    assert f"during {phase}, before this fit's first training step" in str(info.value)
    assert "nothing was saved" in str(info.value)
    assert list(root.rglob("*.ckpt")) == []
    assert signal.getsignal(signal.SIGTERM) is handler  # the handlers from before the fit are back


def test_sigterm_during_grpo_sft_warmup_stops_it_after_the_current_step(tmp_path, fatal_sigterm):
    counter = SigtermOnForward(at=2)  # during warm-up step 2 of 50
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[counter, PreemptionCheckpoint()],
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    with pytest.raises(Preempted) as info:  # before: the process died (here: Killed) in the middle of the warm-up
        trainer.fit(grpo_module(sft_steps=50), datamodule=grpo_data(tmp_path))
    assert counter.calls == 2  # step 2 finished, step 3 never started
    _assert_stopped_before_training(info, "GRPO's SFT warm-up", tmp_path, fatal_sigterm)


@pytest.mark.parametrize("method,phase", [
    (lambda: LISA(n_layers=1, interval=2, sampling="importance", importance_batches=4),
     "LISA's importance measurement"),
    (lambda: OwLore(n_layers=1, interval=2, calibration_batches=4, galore=False), "OwLore's calibration"),
])
def test_sigterm_during_a_calibration_stops_it_after_the_current_batch(tmp_path, fatal_sigterm, method, phase):
    counter = SigtermOnForward(at=1)  # during the first of 4 measured batches
    with pytest.raises(Preempted) as info:  # before: the first training step ran, then Lightning exited with 0
        _lm_fit(tmp_path, [counter, method()])
    assert counter.calls == 1
    _assert_stopped_before_training(info, phase, tmp_path, fatal_sigterm)


def test_sigterm_during_the_sanity_check_stops_it_after_the_current_batch(tmp_path, fatal_sigterm):
    seen = SigtermInSanityCheck()
    with pytest.raises(Preempted) as info:  # before: Lightning's handler ran the default one (Killed)
        _lm_fit(tmp_path, [seen], sanity_steps=3)
    assert seen.batches == 1
    _assert_stopped_before_training(info, "the sanity check", tmp_path, fatal_sigterm)


def test_the_cli_prints_the_same_command_when_nothing_was_saved(monkeypatch, capsys):
    import recipes.cli as cli

    def preempted(**kwargs):
        raise Preempted(signal.SIGTERM, None, 0, False, "GRPO's SFT warm-up")

    monkeypatch.setattr(cli, "RecipesCLI", preempted)
    with pytest.raises(Preempted):
        cli.run_lightning("fit", ["--config", "grpo.yaml", "--ckpt_path", "last"])
    err = capsys.readouterr().err
    assert "Start it again with the same command:\n  python -m recipes fit --config grpo.yaml --ckpt_path last" in err
    assert "Resume with" not in err


def test_under_slurm_a_stop_before_training_requeues_the_job(tmp_path, monkeypatch, fatal_sigterm):
    fake_slurm_job(tmp_path, monkeypatch)
    with pytest.raises(Preempted) as info:
        _lm_fit(tmp_path, [SigtermInSanityCheck()], sanity_steps=2, preemption=PreemptionCheckpoint(requeue=True))
    assert info.value.requeued and "nothing was saved" in str(info.value) and "requeued" in str(info.value)
    assert (tmp_path / "scontrol_called").read_text().split() == ["requeue", "4242"]
