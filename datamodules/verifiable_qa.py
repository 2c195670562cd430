"""Prompts with checkable reference answers for RL with verifiable rewards (GRPO): the user's data or synthetic tasks.

The data is read through ``record_sources`` (JSONL, JSON array, parquet, arrow, CSV, a ``save_to_disk`` folder or
a data set by name); ``columns`` renames other column names first. The accepted forms (GSM8K form with
``#### <number>``, QA form with a list of ``answers``) and their checks are in ``verifiable_records``, which also
renders and tokenizes the prompts once (``datasets.map``, cached by fingerprint, memory-mapped).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from datamodules.chat_encoding import collate_examples, pad
from datamodules.generated import generate_once, keyed_dir
from datamodules.instruction_records import encode_source, split_once
from datamodules.jsonl_records import DataError
from datamodules.record_sources import DatasetSpec, load_source
from datamodules.resumable_loader import data_loader
from datamodules.resumable_sampler import resumable_sampler
from datamodules.rewards import BUILTIN_REWARDS, RewardFn
from datamodules.synthetic_tasks import TASKS, make_problems
from datamodules.tokenizer import CHAR_TOKENIZER, load_tokenizer, require_chat_template
from datamodules.verifiable_records import encode_verifiable, prompt_messages

VERIFIABLE_FORMATS = ("auto", "gsm8k", "qa")


def write_synthetic_rl_splits(directory: str | Path, n_sft: int, n_train: int, n_val: int, seed: int,
                              tasks: tuple[str, ...], max_digits: int) -> dict[str, Path]:
    """Disjoint ``sft`` / ``train`` / ``val`` GSM8K-form files: RL prompts are never seen during the SFT warm-up."""
    total = n_sft + n_train + n_val
    seen: set[tuple[str, str]] = set()
    unique = [p for p in make_problems(4 * total, seed, tasks, max_digits=max_digits)
              if (p.task, p.input) not in seen and not seen.add((p.task, p.input))]
    if len(unique) < total:
        raise ValueError(f"Only {len(unique)} distinct synthetic problems for {total} requested; ask for fewer")
    splits = {"val": unique[:n_val], "train": unique[n_val:n_val + n_train], "sft": unique[n_val + n_train:total]}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, problems in splits.items():
        path = directory / f"{name}.jsonl"
        with path.open("w") as f:  # GSM8K form with a short answer, so completions stay a few tokens long
            for p in problems:
                f.write(json.dumps({"question": p.question, "answer": f"#### {p.answer}"}) + "\n")
        out[name] = path
    return out


class VerifiableQADataModule(L.LightningDataModule):
    """Prompt batches (left-padded, rendered through the tokenizer's chat template) with their reference answers.

    Args:
        train_file: GSM8K-form or QA-form JSONL of RL prompts. ``None`` writes the built-in synthetic tasks
            (GSM8K form, answers ``#### <number>``) to ``synthetic_dir`` with disjoint sft / train / val splits.
        val_file: JSONL of the same form for validation (greedy accuracy); ``None`` with a ``train_file`` holds
            out ``val_fraction`` of it.
        sft_file: instruction data (any form ``InstructionDataModule`` reads) for the policy's optional SFT
            warm-up; with synthetic data the ``sft`` split is used.
        dataset: a Hugging Face data set by name (or a local data set folder) instead of ``train_file`` /
            ``val_file``: ``split`` and ``val_split`` name its splits, ``subset`` and ``revision`` select it.
        data_format: ``auto`` (told from the columns), ``gsm8k`` or ``qa``.
        columns: renames the data's columns, e.g. ``{"problem": "question", "solution": "answer"}``.
        cache_dir: where converted and tokenized data are cached; ``None`` is the ``datasets`` cache.
        num_proc: processes that tokenize (``datasets.map``); the result is cached and reused on the next start.
        tokenizer: a local Hugging Face tokenizer directory, or ``"char"`` for the built-in one.
        system_prompt: optional system message put before every question.
        reward: ``auto`` (``gsm8k_strict`` for GSM8K form, ``qa_exact_match`` for QA form) or one of
            ``gsm8k_strict``, ``gsm8k_flexible``, ``qa_exact_match``.
        max_prompt_length: prompts longer than this many tokens are an error (named by file and line).
        batch_size: prompts per rollout batch (each gets G completions).
        sft_batch_size / sft_max_length: batch size and truncation of the SFT warm-up data.
        synthetic_*: sizes, tasks and digits of the built-in synthetic problems.
    """

    # the settings that define what is trained: a resumed run must give the checkpoint's (python -m recipes)
    defining_settings: frozenset[str] = frozenset({"tokenizer"})

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        sft_file: str | None = None,
        tokenizer: str = CHAR_TOKENIZER,
        system_prompt: str | None = None,
        reward: str = "auto",
        max_prompt_length: int = 64,
        batch_size: int = 8,
        val_batch_size: int = 64,
        val_fraction: float = 0.05,
        sft_batch_size: int = 32,
        sft_max_length: int = 48,
        seed: int = 0,
        synthetic_dir: str = "data/synthetic",
        synthetic_sft_size: int = 4000,
        synthetic_train_size: int = 2000,
        synthetic_val_size: int = 128,
        synthetic_tasks: tuple[str, ...] = TASKS,
        synthetic_max_digits: int = 2,
        num_workers: int = 0,
        dataset: str | None = None,
        subset: str | None = None,
        revision: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        data_format: str = "auto",
        columns: dict[str, str] | None = None,
        cache_dir: str | None = None,
        num_proc: int = 1,
    ) -> None:
        super().__init__()
        if reward != "auto" and reward not in BUILTIN_REWARDS:
            raise ValueError(f"reward must be 'auto' or one of {sorted(BUILTIN_REWARDS)}, got {reward!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        sizes = {"batch_size": batch_size, "val_batch_size": val_batch_size, "sft_batch_size": sft_batch_size,
                 "max_prompt_length": max_prompt_length, "sft_max_length": sft_max_length}
        small = {k: v for k, v in sizes.items() if v < 1}
        if small or num_workers < 0:
            raise ValueError(f"{small or {'num_workers': num_workers}}: expected batch sizes and lengths >= 1 and "
                             "num_workers >= 0")
        if num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {num_proc}")
        if data_format not in VERIFIABLE_FORMATS:
            raise ValueError(f"data_format must be one of {VERIFIABLE_FORMATS}, got {data_format!r}")
        if dataset is not None and (train_file or val_file):
            raise ValueError("give either dataset (with split / val_split) or train_file / val_file, not both; got "
                             f"dataset={dataset!r} and train_file={train_file!r}")
        unknown = set(synthetic_tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"Unknown synthetic_tasks {sorted(unknown)}; expected a subset of {TASKS}")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        require_chat_template(self.tokenizer, f"{tokenizer!r}")
        self.datasets: dict = {}  # split -> memory-mapped ``datasets.Dataset``
        self.form: str | None = None

    def _synthetic_key(self) -> dict:
        hp = self.hparams
        return {"n_sft": hp.synthetic_sft_size, "n_train": hp.synthetic_train_size, "n_val": hp.synthetic_val_size,
                "seed": hp.seed, "tasks": list(hp.synthetic_tasks), "max_digits": hp.synthetic_max_digits}

    def synthetic_paths(self) -> dict[str, Path]:
        """The synthetic splits, in a folder of ``synthetic_dir`` keyed by sizes, seed, tasks and digits."""
        d = keyed_dir(self.hparams.synthetic_dir, "verifiable", self._synthetic_key())
        return {split: d / f"{split}.jsonl" for split in ("sft", "train", "val")}

    def prepare_data(self) -> None:
        hp = self.hparams
        if hp.train_file is None and hp.dataset is None:
            generate_once(hp.synthetic_dir, "verifiable", self._synthetic_key(),
                          lambda d: write_synthetic_rl_splits(d, hp.synthetic_sft_size, hp.synthetic_train_size,
                                                              hp.synthetic_val_size, hp.seed,
                                                              tuple(hp.synthetic_tasks), hp.synthetic_max_digits))

    def files(self) -> dict[str, str | Path | DatasetSpec | None]:
        """The source of each split: a file or folder, a data set split, or ``None``."""
        hp = self.hparams
        if hp.dataset is not None:
            val = None if hp.val_split is None else DatasetSpec(hp.dataset, hp.val_split, hp.subset, hp.revision)
            return {"train": DatasetSpec(hp.dataset, hp.split, hp.subset, hp.revision), "val": val, "sft": hp.sft_file}
        if hp.train_file is None:
            return dict(self.synthetic_paths())
        return {"train": hp.train_file, "val": hp.val_file, "sft": hp.sft_file}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        files = self.files()
        hp = self.hparams
        self.form, train = self._encode(files["train"])
        if files["val"] is None:
            train, val = split_once(train, hp.val_fraction, hp.seed, files["train"], hp.cache_dir)
        else:
            val_form, val = self._encode(files["val"])
            if val_form != self.form:
                raise DataError(f"{files['val']}: validation file is in {val_form} form, train in {self.form} form")
        self.datasets = {"train": train, "val": val}
        if files["sft"] is not None:
            sft = load_source(files["sft"], hp.cache_dir)
            if len(sft) == 0:
                raise DataError(f"{sft.name}: the file has no records (empty split)")
            self.datasets["sft"] = encode_source(sft, self.tokenizer, hp.sft_max_length, num_proc=hp.num_proc,
                                                 cache_dir=hp.cache_dir).select_columns(["input_ids", "labels"])
        if stage == "fit":
            self._check_batches(files)
        rank_zero_info(f"Verifiable QA data ({self.form} form): "
                       + ", ".join(f"{k} {len(v)}" for k, v in self.datasets.items()))

    def _encode(self, source: str | Path | DatasetSpec):
        """``(form, rows)`` of one source: checked, rendered and tokenized once (cached by fingerprint)."""
        hp = self.hparams
        return encode_verifiable(load_source(source, hp.cache_dir), self.tokenizer, hp.max_prompt_length,
                                 hp.system_prompt, hp.data_format, hp.columns, hp.num_proc, hp.cache_dir)

    def _check_batches(self, files: dict) -> None:
        """Incomplete rollout / warm-up batches are dropped, so fewer samples per device than a batch is no batch."""
        world = self.trainer.world_size if self.trainer is not None else 1
        hp = self.hparams
        for split, size, name in (("train", hp.batch_size, "batch_size"), ("sft", hp.sft_batch_size, "sft_batch_size")):
            have = len(self.datasets.get(split, ()))
            if split in self.datasets and have // world < size:
                raise DataError(f"{files[split]}: {have} {split} samples"
                                + (f" over {world} devices" if world > 1 else "")
                                + f" make no complete batch of data.{name}={size} (incomplete batches are dropped), "
                                f"so training would get no batch; lower data.{name} to at most {have // world} or "
                                "add data")

    def messages(self, question: str) -> list[dict[str, str]]:
        """The chat ``question`` is asked in (with the ``system_prompt``), ending in the assistant's turn."""
        return prompt_messages(question, self.hparams.system_prompt)

    def reward_fn(self) -> RewardFn:
        """The verifier of this data: the built-in reward named by ``reward`` (``auto`` picks by the file's form)."""
        if not self.form:
            self.setup()
        name = self.hparams.reward
        if name == "auto":
            name = "gsm8k_strict" if self.form == "gsm8k" else "qa_exact_match"
        return BUILTIN_REWARDS[name]()

    def collate(self, rows: list[dict]) -> dict:
        """Left-padded prompts, their texts, and every reference column as a list."""
        batch = {"prompt_input_ids": pad([r["prompt_ids"] for r in rows], self.tokenizer.pad_token_id, left=True),
                 "prompt_attention_mask": pad([[1] * len(r["prompt_ids"]) for r in rows], 0, left=True),
                 "prompts": [r["prompt"] for r in rows]}
        for key in rows[0]:
            if key not in ("prompt_ids", "prompt"):
                batch[key] = [r[key] for r in rows]
        return batch

    def _loader(self, split: str, batch_size: int, shuffle: bool, collate) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"No {split} split: set {split}_file (or leave train_file unset for the synthetic tasks)")
        dataset = self.datasets[split]
        # the RL prompts' order is seeded per epoch, identical on every rank and resumable mid-epoch
        sampler = resumable_sampler(dataset, self.trainer, batch_size, self.hparams.seed) if split == "train" else None
        return data_loader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle and sampler is None,
                           drop_last=shuffle, num_workers=self.hparams.num_workers, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, True, self.collate)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.val_batch_size, False, self.collate)

    def sft_dataloader(self) -> DataLoader:
        """Instruction batches (``input_ids``, ``attention_mask``, ``labels``) for the policy's SFT warm-up."""
        return self._loader("sft", self.hparams.sft_batch_size, True,
                            lambda b: collate_examples(b, self.tokenizer.pad_token_id))
