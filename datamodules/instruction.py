"""Instruction-tuning data module: the user's files or a data set by name (see ``record_sources`` and
``record_forms`` for what is accepted), or the built-in synthetic tasks; tokenized once and memory-mapped."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from datamodules.chat_encoding import collate_examples
from datamodules.generated import generate_once, keyed_dir
from datamodules.instruction_records import encode_source, split_once
from datamodules.jsonl_records import DataError
from datamodules.packing import PackedDataset, collate_packed
from datamodules.record_forms import DataFormat, check_format_args
from datamodules.record_sources import DatasetSpec, load_source
from datamodules.resumable_loader import data_loader
from datamodules.resumable_sampler import resumable_sampler
from datamodules.synthetic_tasks import TASKS, Format, write_synthetic_splits
from datamodules.tokenizer import CHAR_TOKENIZER, load_tokenizer, require_chat_template


class InstructionDataModule(L.LightningDataModule):
    """Supervised fine-tuning data with the loss on response tokens only.

    Args:
        train_file: training data: a JSONL, JSON array, parquet, arrow or CSV file, or a ``save_to_disk`` folder.
            ``None`` (and no ``dataset``) writes the built-in synthetic tasks to ``synthetic_dir`` and reads them
            back through the same loader.
        val_file: validation data, the same kinds; when ``None`` (and no ``val_split``) a ``val_fraction`` of the
            training data is held out (seeded).
        test_file: optional test data.
        dataset: a Hugging Face data set by name (or a local data set folder) instead of files; read from the local
            cache when ``HF_HUB_OFFLINE=1``. ``split`` / ``val_split`` / ``test_split`` name its splits,
            ``subset`` its configuration and ``revision`` its version.
        data_format: ``auto`` (told from each record's fields) or ``messages``, ``sharegpt``, ``alpaca``,
            ``prompt_completion``, ``gsm8k``.
        columns: renames the data's columns to the form's fields, e.g. ``{"query": "instruction"}``.
        tokenizer: a local Hugging Face tokenizer directory, or ``"char"`` for the built-in one.
        max_length: sequences are truncated to this many tokens; a prompt that does not fit is an error.
        batch_size: per-device batch size.
        val_fraction: share of ``train_file`` held out when no ``val_file`` is given.
        seed: seed of the train/val split and of the synthetic problems.
        synthetic_dir: where the synthetic splits are written (into a subfolder keyed by format, size, seed and
            tasks, written once and atomically, so concurrent runs share it safely).
        synthetic_format: ``chat``, ``alpaca`` or ``gsm8k``: the form the synthetic files are written in.
        synthetic_train_size: number of synthetic training problems (validation and test get 200 each).
        synthetic_tasks: which of addition, reversal, sorting to generate.
        num_workers: DataLoader worker processes.
        num_proc: processes that tokenize (``datasets.map``); the result is cached and reused on the next start.
        cache_dir: where converted and tokenized data are cached; ``None`` is the ``datasets`` cache
            (``HF_DATASETS_CACHE``).
        packing: place several training examples side by side in each row of ``max_length`` tokens (position ids
            restart per example, attention stays inside each example, see ``datamodules.packing``), so the batch
            holds ``batch_size`` rows of real tokens instead of padding. Validation and test stay one example a
            row (the exact-match answers need their prompts).
    """

    # the settings that define what is trained: a resumed run must give the checkpoint's (python -m recipes)
    defining_settings: frozenset[str] = frozenset({"tokenizer"})

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        tokenizer: str = CHAR_TOKENIZER,
        max_length: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        seed: int = 0,
        synthetic_dir: str = "data/synthetic",
        synthetic_format: Format = "chat",
        synthetic_train_size: int = 4000,
        synthetic_tasks: tuple[str, ...] = TASKS,
        num_workers: int = 0,
        dataset: str | None = None,
        subset: str | None = None,
        revision: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        data_format: DataFormat = "auto",
        columns: dict[str, str] | None = None,
        num_proc: int = 1,
        cache_dir: str | None = None,
        packing: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got batch_size={batch_size}, "
                             f"num_workers={num_workers}")
        if num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {num_proc}")
        if dataset is not None and (train_file or val_file or test_file):
            raise ValueError("give either dataset (with split / val_split / test_split) or train_file / val_file / "
                             f"test_file, not both; got dataset={dataset!r} and train_file={train_file!r}")
        check_format_args(data_format, columns)
        unknown = set(synthetic_tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"Unknown synthetic_tasks {sorted(unknown)}; expected a subset of {TASKS}")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        require_chat_template(self.tokenizer, f"{tokenizer!r}")
        self.datasets: dict = {}

    def _synthetic_key(self) -> dict:
        hp = self.hparams
        return {"format": hp.synthetic_format, "n_train": hp.synthetic_train_size, "seed": hp.seed,
                "tasks": list(hp.synthetic_tasks)}

    def synthetic_paths(self) -> dict[str, Path]:
        """The synthetic splits, in a folder of ``synthetic_dir`` keyed by format, size, seed and tasks."""
        d = keyed_dir(self.hparams.synthetic_dir, self.hparams.synthetic_format, self._synthetic_key())
        return {split: d / f"{split}.jsonl" for split in ("train", "val", "test")}

    def prepare_data(self) -> None:
        """Write the synthetic tasks when they are used, then load and tokenize once (on one process per node),
        so that every rank's ``setup`` opens the cached result instead of tokenizing too."""
        hp = self.hparams
        if hp.train_file is None and hp.dataset is None:
            generate_once(hp.synthetic_dir, hp.synthetic_format, self._synthetic_key(),
                          lambda d: write_synthetic_splits(d, hp.synthetic_format, n_train=hp.synthetic_train_size,
                                                           seed=hp.seed, tasks=tuple(hp.synthetic_tasks)))
        self._splits()

    def files(self) -> dict[str, str | Path | DatasetSpec | None]:
        """The source of each split: a file or folder, a data set split, or ``None``."""
        hp = self.hparams
        if hp.dataset is not None:
            return {name: None if split is None else DatasetSpec(hp.dataset, split, hp.subset, hp.revision)
                    for name, split in (("train", hp.split), ("val", hp.val_split), ("test", hp.test_split))}
        if hp.train_file is None:
            return dict(self.synthetic_paths())
        return {"train": hp.train_file, "val": hp.val_file, "test": hp.test_file}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.datasets = self._splits()
        if self.hparams.packing:
            self.datasets["train"] = PackedDataset(self.datasets["train"], self.hparams.max_length)
        rank_zero_info("Instruction data: " + ", ".join(f"{k} {len(v)}" for k, v in self.datasets.items())
                       + (" (train: packed rows)" if self.hparams.packing else ""))

    def _splits(self) -> dict:
        """Every split, tokenized (from the cache when it was tokenized before)."""
        files = self.files()
        train = self._encode(files["train"])
        if files["val"] is None:
            train, val = split_once(train, self.hparams.val_fraction, self.hparams.seed, files["train"],
                                    self.hparams.cache_dir)
        else:
            val = self._encode(files["val"])
        splits = {"train": train.select_columns(["input_ids", "labels"]), "val": val}
        if files["test"] is not None:
            splits["test"] = self._encode(files["test"])
        return splits

    def _encode(self, source: str | Path | DatasetSpec):
        """The tokenized records of one source (cached by fingerprint, memory-mapped)."""
        hp = self.hparams
        records = load_source(source, hp.cache_dir)
        if len(records) == 0:
            raise DataError(f"{records.name}: the file has no records (empty split)")
        return encode_source(records, self.tokenizer, hp.max_length, hp.data_format, hp.columns, hp.num_proc,
                             hp.cache_dir)

    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"No {split} split: set {split}_file (or leave train_file unset for the synthetic tasks)")
        dataset, batch_size = self.datasets[split], self.hparams.batch_size
        sampler = resumable_sampler(dataset, self.trainer, batch_size, self.hparams.seed) if split == "train" else None
        collate = collate_packed if isinstance(dataset, PackedDataset) else collate_examples
        return data_loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.hparams.num_workers,
                           collate_fn=lambda b: collate(b, self.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
