"""Drop-in Lightning callbacks for layer-wise training techniques.

The top level holds what a user attaches to a run:

- ``lisa``: ``LISA``, layerwise importance sampling (a few blocks train at a time).
- ``owlore``: ``OwLore``, outlier-weighted block sampling with GaLore low-rank gradients.
- ``badam``: ``BAdam``, block coordinate descent over the blocks in a fixed or random order.
- ``layer_drop``: ``ProgressiveLayerDrop``, blocks skipped with a rising, depth-scaled probability.
- ``llds``: ``LLDS``, the likelihood-displacement regularizer for GRPO.
- ``layer_diagnostics``: ``LayerDiagnostics``, per-block statistics and heatmaps during training.
- ``mae_reconstruction``: ``MAEReconstructionLogger``, MAE reconstruction grids.

``run`` holds run safety, what the recipes' CLI installs for every run (preemption, periodic and atomic
checkpoints, finite-loss, empty-fit and train-mode checks, resume settings, exact resume, run info, progress
bar, throughput); ``core`` holds the helpers the callbacks build on that are not callbacks themselves.

Names are imported lazily, so ``class_path: callbacks.LISA`` in a YAML only imports what it uses.
"""

import importlib

_EXPORTS = {
    "find_blocks": "callbacks.core.blocks",
    "ModelParts": "callbacks.core.blocks",
    "LISA": "callbacks.lisa",
    "OwLore": "callbacks.owlore",
    "BAdam": "callbacks.badam",
    "LayerDiagnostics": "callbacks.layer_diagnostics",
    "ProgressiveLayerDrop": "callbacks.layer_drop",
    "LLDS": "callbacks.llds",
    "MAEReconstructionLogger": "callbacks.mae_reconstruction",
    "FiniteLossGuard": "callbacks.run.finite_loss",
    "RunInfoLogger": "callbacks.run.run_info",
    "ExactResume": "callbacks.run.exact_resume",
    "StepProgressBar": "callbacks.run.progress",
    "PreemptionCheckpoint": "callbacks.run.preemption",
    "PeriodicLastCheckpoint": "callbacks.run.periodic_checkpoint",
    "EmptyFitGuard": "callbacks.run.empty_fit",
    "TrainModeCheck": "callbacks.run.train_mode",
    "OptimizerSettingsOnResume": "callbacks.run.resume_settings",
    "ThroughputLogger": "callbacks.run.throughput",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'callbacks' has no attribute {name!r}")
