"""Data modules shared by all recipes (imported lazily, so a YAML only imports what it uses)."""

import importlib

_EXPORTS = {
    "InstructionDataModule": "datamodules.instruction",
    "VerifiableQADataModule": "datamodules.verifiable_qa",
    "ChestXray14DataModule": "datamodules.chestxray14",
    "CheXpertDataModule": "datamodules.chexpert",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
