"""Data modules shared by all recipes."""

from datamodules.instruction import InstructionDataModule

__all__ = ["InstructionDataModule"]
