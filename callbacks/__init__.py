"""Drop-in Lightning callbacks for layer-wise training techniques.

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
    "FiniteLossGuard": "callbacks.finite_loss",
    "RunInfoLogger": "callbacks.run_info",
    "ExactResume": "callbacks.exact_resume",
    "StepProgressBar": "callbacks.progress",
    "PreemptionCheckpoint": "callbacks.preemption",
    "PeriodicLastCheckpoint": "callbacks.periodic_checkpoint",
    "EmptyFitGuard": "callbacks.empty_fit",
    "OptimizerSettingsOnResume": "callbacks.resume_settings",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'callbacks' has no attribute {name!r}")
