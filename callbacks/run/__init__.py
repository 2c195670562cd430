"""Run safety: what the recipes' CLI installs for every run, whatever technique trains.

- ``preemption``: ``PreemptionCheckpoint``, SIGTERM / SIGUSR1 / SIGINT save a checkpoint, then the run exits.
- ``periodic_checkpoint``: ``PeriodicLastCheckpoint``, ``last.ckpt`` every N minutes or M optimizer steps.
- ``atomic_checkpoint``: ``AtomicCheckpointIO``, checkpoint writes that never destroy the previous good file.
- ``finite_loss``: ``FiniteLossGuard``, stop at the first non-finite loss.
- ``empty_fit``: ``EmptyFitGuard``, a fit that trained on nothing is an error.
- ``train_mode``: ``TrainModeCheck``, trainable modules in eval mode at the start of training stop the run.
- ``resume_settings``: ``OptimizerSettingsOnResume``, the optimizer settings given now win over the checkpoint's.
- ``exact_resume``: ``ExactResume``, a mid-epoch resume continues as the uninterrupted run would have.
- ``run_info``: ``RunInfoLogger``, the seed and library versions logged with every run.
- ``progress``: ``StepProgressBar``, the optimizer step and its budget next to the epoch.
- ``throughput``: ``ThroughputLogger``, samples/s, tokens/s and MFU of training on the dashboard.

The public callbacks are also exported from :mod:`callbacks` (``class_path: callbacks.PreemptionCheckpoint``).
"""
