"""Data modules shared by all recipes and what they build on.

- ``instruction``: ``InstructionDataModule``, instruction tuning from local files or the synthetic tasks.
- ``verifiable_qa``: ``VerifiableQADataModule``, prompts with checkable answers for GRPO.
- ``text_corpus``: ``TextCorpusDataModule``, pre-training text shards packed into fixed-length blocks once.
- ``chestxray14`` / ``chexpert``: ``ChestXray14DataModule`` / ``CheXpertDataModule``, the X-ray sets as shipped.
- ``xray_dataset`` / ``xray_transforms``: what the X-ray modules share: records, splits, the image pipeline.
- ``xray_augment``: crop, flip and RandAugment drawing from a per-sample generator, never a global one.
- ``phantom_cxr``: synthetic chest X-ray phantoms in the NIH and CheXpert folder formats.
- ``record_sources`` / ``record_forms``: text records from files, folders or data sets by name; their forms as chat.
- ``instruction_records``: instruction records normalized and tokenized once (``datasets.map``, cached).
- ``packing``: tokenized examples side by side in rows of ``max_length`` (``data.packing: true``).
- ``verifiable_records``: verifiable-QA records checked (GSM8K / QA form), prompts tokenized once (cached).
- ``jsonl_records`` / ``chat_encoding``: data errors and strict UTF-8; chat messages to token ids and labels.
- ``tokenizer``: local Hugging Face tokenizers or the built-in character tokenizer.
- ``rewards``: verifiable rewards and the guard that calls any reward function.
- ``synthetic_tasks`` / ``generated``: the built-in tasks and the folder generated defaults are written to once.
- ``holdout``: a seeded validation share of a training file.
- ``resumable_sampler``: a shuffling sampler that resumes mid-epoch identically on every rank.
- ``resumable_loader``: the training loader over it, which Lightning sees is resumable mid-epoch.
- ``diversity``: generation diversity metrics and the CRC proxy task.

The data module classes are imported lazily, so a YAML only imports what it uses.
"""

import importlib

_EXPORTS = {
    "InstructionDataModule": "datamodules.instruction",
    "VerifiableQADataModule": "datamodules.verifiable_qa",
    "TextCorpusDataModule": "datamodules.text_corpus",
    "ChestXray14DataModule": "datamodules.chestxray14",
    "CheXpertDataModule": "datamodules.chexpert",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
