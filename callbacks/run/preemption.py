"""Preemption: SIGTERM / SIGUSR1 / SIGINT save a checkpoint of the step reached, then the run exits non-zero."""

from __future__ import annotations

import atexit
import copy
import os
import re
import signal
import subprocess
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from callbacks.run.atomic_checkpoint import checkpoint_dir

SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint is written; the exit status is ``128 + signal``
    (143 for SIGTERM, 138 for SIGUSR1, 130 for SIGINT), the shell's convention for a signalled process.

    ``path`` is ``None`` when the signal came in a phase before the fit's first training step (``phase``: the
    sanity check, GRPO's warm-up, a calibration): there was no training state newer than the run's start, so
    nothing was saved."""

    def __init__(self, signum: int, path: str | None, step: int, requeued: bool, phase: str | None = None) -> None:
        super().__init__(128 + signum)
        self.signum, self.path, self.step, self.requeued, self.phase = signum, path, step, requeued, phase

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        then = "the SLURM job was requeued" if self.requeued else f"exiting with status {self.code}"
        if self.path is None:
            return (f"{name} received during {self.phase}, before this fit's first training step: stopped it; "
                    f"nothing was saved (the checkpoint the run started from, if any, is unchanged); {then}")
        return f"{name} received: saved the checkpoint of step {self.step} to {self.path}; {then}"


def slurm_job_id() -> str | None:
    """``<array job>_<task>`` or the job id when running under SLURM with a batch job, else ``None``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def _release_process_group_at_exit() -> None:
    atexit.unregister(release_process_group)  # once, however many stops a process (a test session) raises
    atexit.register(release_process_group)


def release_process_group() -> None:
    """Destroy the default process group at exit, after a stop every rank agreed on (so no rank is left in a
    collective). Left to the interpreter's finalization, gloo's worker threads can outlive it and the process
    aborts (SIGABRT) instead of exiting with ``128 + signal``; torch asks for an explicit destroy at exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class PreemptionCheckpoint(Callback):
    """On SIGTERM, SIGUSR1 or SIGINT, finish the current training step (or validation batch), save
    ``<checkpoint folder>/last.ckpt`` and raise :class:`Preempted` on every rank (the run exits with
    ``128 + signal``). With gradient accumulation the
    current window is finished first (at most ``accumulate_grad_batches - 1`` more batches): a checkpoint holds no
    partial gradients, so the resumed run is exactly the uninterrupted one.

    A signal before the fit's first training step (during the sanity check, GRPO's SFT warm-up, LISA's importance
    measurement or OwLore's calibration) stops that phase after its current unit (a batch, a warm-up step) and
    raises :class:`Preempted` without saving: no training state is newer than the one the run started from.
    Long phases outside the training loop call :func:`stop_if_preempted` between their units.

    The handlers are installed at ``setup`` and replace Lightning's own from the sanity check on (Lightning's
    SIGTERM handling exits with status 0 without saving; under SLURM its SIGUSR1 handler saves from inside the
    signal handler, in the middle of a step). The decision is agreed across ranks with one boolean all-reduce per
    step, so a signal that reaches only one rank stops all of them at the same step. Under SLURM
    (``SLURMEnvironment`` with ``auto_requeue``, Lightning's default there) rank 0 runs ``scontrol requeue <job>``
    after the save, as Lightning does, and the requeued job resumes with ``--ckpt_path auto``. A second SIGINT
    interrupts at once (``KeyboardInterrupt``).

    Args:
        signals: names of the signals to handle.
        filename: file name of the checkpoint inside the checkpoint folder.
        requeue: ``None`` requeues when the trainer's cluster environment is SLURM with ``auto_requeue``.
    """

    def __init__(self, signals: tuple[str, ...] = SIGNALS, filename: str = "last.ckpt",
                 requeue: bool | None = None) -> None:
        unknown = [s for s in signals if s not in SIGNALS]
        if unknown:
            raise ValueError(f"signals must be among {SIGNALS}, got {unknown}")
        if not filename.endswith(".ckpt") or "/" in filename:
            raise ValueError(f"filename must be a plain name ending in .ckpt, got {filename!r}")
        self.signals = tuple(signals)
        self.filename = filename
        self.requeue = requeue
        self.received: int | None = None
        self._step_at_batch_start = 0
        self._window_closed = True  # the last training batch ended an accumulation window
        self._trained = False  # this fit has run a training batch
        self._loops_at_batch_end: dict[str, Any] | None = None  # Lightning's loop counters at that batch's end
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:  # no printing here: a handler may interrupt a print in progress
            self.received = signum

    def _install(self) -> None:
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _take_over(self, trainer: L.Trainer) -> None:
        """Lightning installs its SIGTERM handler after ``on_fit_start``, around ours: put ours back alone, and
        have Lightning's teardown restore the handlers from before the fit rather than ours."""
        if trainer.received_sigterm and self.received is None:
            self.received = signal.SIGTERM
        if not self._previous:
            self._install()
        for signum in self._previous:
            signal.signal(signum, self._handle)
        self._hand_originals_to_lightning(trainer)

    def _hand_originals_to_lightning(self, trainer: L.Trainer) -> None:
        """Lightning's teardown puts back the handlers it found when it installed its own; ours may be among
        them (we install at ``setup``, before it), so it is given the ones from before the fit instead."""
        saved = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
        if isinstance(saved, dict):
            saved.update({signum: h for signum, h in self._previous.items() if signum in saved})

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """From here on a signal is noted, not fatal: the fit's start (model building, GRPO's warm-up, a
        calibration) stops at its next check (:func:`stop_if_preempted`) instead of dying at once."""
        if stage == "fit":
            self.received, self._trained, self._window_closed = None, False, True
            if not self._previous:
                self._install()

    @override
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_over(trainer)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_over(trainer)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._window_closed = trainer.global_step != self._step_at_batch_start
        self._trained = True
        self._loops_at_batch_end = copy.deepcopy(trainer.fit_loop.state_dict())  # progress counters: small
        if self._window_closed:  # inside an accumulation window the stop waits for its end
            self._stop_if_signalled(trainer)

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """A signal during a fit's validation stops it after the current batch: the training state is whole (the
        last optimizer step is done), so it is saved (see :meth:`on_save_checkpoint`) and the run exits."""
        if trainer.sanity_checking:
            self.stop_phase(trainer, "the sanity check")
        elif trainer.state.fn == "fit" and self._window_closed and self._previous:
            self._stop_if_signalled(trainer)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A save during validation records the loops as they were when the training batch ended, as a save at
        that batch's end would (Lightning's own restart in the middle of a validation loses the data position);
        the random states follow the same rule (``ExactResume``). The resumed run goes on training; the
        interrupted validation is not repeated."""
        if trainer.validating and trainer.state.fn == "fit" and self._loops_at_batch_end is not None:
            checkpoint["loops"]["fit_loop"] = self._loops_at_batch_end

    def _agreed(self, trainer: L.Trainer) -> bool:
        """Whether any rank received a signal (one all-reduce; every rank calls this at the same point)."""
        local = self.received is not None
        return trainer.strategy.reduce_boolean_decision(local, all=False) if trainer.world_size > 1 else local

    def stop_phase(self, trainer: L.Trainer, phase: str) -> None:
        """Between two units of ``phase`` (a long phase outside the training loop): after a signal, raise
        :class:`Preempted`, having saved the state reached if this fit has trained (at a window's end), else
        nothing."""
        if not self._previous:  # not in a fit (validate, test) or not set up
            return
        if self._trained:
            if self._window_closed:
                self._stop_if_signalled(trainer)
            return
        if not self._agreed(trainer):
            return
        err = Preempted(self.received or signal.SIGTERM, None, trainer.global_step, self._requeue(trainer), phase)
        rank_zero_info(str(err))
        _release_process_group_at_exit()
        raise err

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        if not self._agreed(trainer):
            return
        signum = self.received or signal.SIGTERM
        path = str(checkpoint_dir(trainer) / self.filename)
        trainer.save_checkpoint(path, weights_only=False)  # full state; said, so Lightning does not note it
        requeued = self._requeue(trainer)
        err = Preempted(signum, path, trainer.global_step, requeued)
        rank_zero_info(str(err))
        _release_process_group_at_exit()
        raise err

    def _requeue(self, trainer: L.Trainer) -> bool:
        env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
        under_slurm = env.auto_requeue if isinstance(env, SLURMEnvironment) else SLURMEnvironment.detect()
        wanted = self.requeue if self.requeue is not None else under_slurm
        job = slurm_job_id()
        if not wanted or job is None or not trainer.is_global_zero:
            return bool(wanted and job)
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        except OSError as err:  # no scontrol on this node: the checkpoint is saved, the job is not requeued
            print(f"scontrol requeue {job} could not run ({err}); resume with --ckpt_path auto", flush=True)
            return False
        if result.returncode != 0:
            print(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}", flush=True)
        return result.returncode == 0

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()  # a fit that never reached training (e.g. no training batch)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._hand_originals_to_lightning(trainer)  # Lightning's teardown runs after this hook
        self._restore()


def stop_if_preempted(trainer: L.Trainer | None, phase: str) -> None:
    """Call between the units of a long phase outside the training loop (a warm-up step, a calibration batch,
    named by ``phase`` in the message): after a preemption signal, the run stops there (see
    :meth:`PreemptionCheckpoint.stop_phase`). Does nothing without a :class:`PreemptionCheckpoint`."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, PreemptionCheckpoint):
            callback.stop_phase(trainer, phase)
