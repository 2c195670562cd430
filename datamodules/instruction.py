"""Instruction-tuning data module: local JSONL (Alpaca, chat or GSM8K form) or the built-in synthetic tasks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from datamodules.chat_encoding import collate_examples, encode_chat, encode_prompt
from datamodules.generated import generate_once, keyed_dir
from datamodules.holdout import holdout_split
from datamodules.jsonl_records import read_instruction_file
from datamodules.resumable_sampler import resumable_sampler
from datamodules.synthetic_tasks import TASKS, Format, write_synthetic_splits
from datamodules.tokenizer import CHAR_TOKENIZER, load_tokenizer, require_chat_template


class InstructionDataModule(L.LightningDataModule):
    """Supervised fine-tuning data with the loss on response tokens only.

    Args:
        train_file: JSONL training data. ``None`` writes the built-in synthetic tasks to ``synthetic_dir`` and
            reads them back through the same loader.
        val_file: JSONL validation data; when ``None`` a ``val_fraction`` of ``train_file`` is held out (seeded).
        test_file: optional JSONL test data.
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
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got batch_size={batch_size}, "
                             f"num_workers={num_workers}")
        unknown = set(synthetic_tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"Unknown synthetic_tasks {sorted(unknown)}; expected a subset of {TASKS}")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        require_chat_template(self.tokenizer, f"{tokenizer!r}")
        self.datasets: dict[str, list[dict]] = {}

    def _synthetic_key(self) -> dict:
        hp = self.hparams
        return {"format": hp.synthetic_format, "n_train": hp.synthetic_train_size, "seed": hp.seed,
                "tasks": list(hp.synthetic_tasks)}

    def synthetic_paths(self) -> dict[str, Path]:
        """The synthetic splits, in a folder of ``synthetic_dir`` keyed by format, size, seed and tasks."""
        d = keyed_dir(self.hparams.synthetic_dir, self.hparams.synthetic_format, self._synthetic_key())
        return {split: d / f"{split}.jsonl" for split in ("train", "val", "test")}

    def prepare_data(self) -> None:
        if self.hparams.train_file is None:
            hp = self.hparams
            generate_once(hp.synthetic_dir, hp.synthetic_format, self._synthetic_key(),
                          lambda d: write_synthetic_splits(d, hp.synthetic_format, n_train=hp.synthetic_train_size,
                                                           seed=hp.seed, tasks=tuple(hp.synthetic_tasks)))

    def files(self) -> dict[str, str | Path | None]:
        hp = self.hparams
        if hp.train_file is None:
            return dict(self.synthetic_paths())
        return {"train": hp.train_file, "val": hp.val_file, "test": hp.test_file}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        files = self.files()
        train = read_instruction_file(files["train"])
        if files["val"] is None:
            train, val = holdout_split(train, self.hparams.val_fraction, self.hparams.seed, files["train"])
        else:
            val = read_instruction_file(files["val"])
        self.datasets = {"train": self._encode(train, with_answers=False), "val": self._encode(val, with_answers=True)}
        if files["test"] is not None:
            self.datasets["test"] = self._encode(read_instruction_file(files["test"]), with_answers=True)
        rank_zero_info("Instruction data: " + ", ".join(f"{k} {len(v)}" for k, v in self.datasets.items()))

    def _encode(self, records: list[tuple[str, list[dict]]], with_answers: bool) -> list[dict]:
        out = []
        for where, messages in records:
            example = encode_chat(self.tokenizer, messages, self.hparams.max_length, where)
            if with_answers:
                example["prompt_ids"] = encode_prompt(self.tokenizer, messages, where)
                example["answer"] = messages[-1]["content"]
            out.append(example)
        return out

    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"No {split} split: set {split}_file (or leave train_file unset for the synthetic tasks)")
        dataset, batch_size = self.datasets[split], self.hparams.batch_size
        sampler = resumable_sampler(dataset, self.trainer, batch_size, self.hparams.seed) if split == "train" else None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.hparams.num_workers,
                          collate_fn=lambda b: collate_examples(b, self.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
