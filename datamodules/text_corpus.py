"""Pre-training corpus: plain text, JSONL or parquet shards, tokenized and packed into fixed-length blocks once.

Documents are the paragraphs of plain text files (separated by a blank line) or the rows of JSONL / parquet files
(their ``text_column``). A seeded share of the documents is held out for validation, so no document is split
between training and validation. Each split is tokenized (an end-of-text token after every document) and packed
into blocks of ``max_length`` tokens through ``datasets.map``, cached by a fingerprint of the shards, the tokenizer
and the settings, and memory-mapped; a second start opens the packed blocks. Training batches come from the
resumable sampler, so a run resumed mid-epoch sees exactly the blocks the uninterrupted run would have seen.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import datasets
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from datamodules.generated import generate_once, keyed_dir
from datamodules.holdout import holdout_indices
from datamodules.instruction_records import tokenizer_fingerprint
from datamodules.jsonl_records import DataError
from datamodules.record_sources import quiet_progress
from datamodules.resumable_loader import data_loader
from datamodules.resumable_sampler import resumable_sampler
from datamodules.synthetic_tasks import TASKS, make_problems
from datamodules.tokenizer import CHAR_TOKENIZER, load_tokenizer

PACKING_VERSION = 1  # bump when packing changes, so cached blocks are rebuilt
BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def shard_paths(files: list[str]) -> list[str]:
    """The shards named by ``files`` (paths or glob patterns), sorted; a pattern matching nothing is an error."""
    paths = []
    for pattern in files:
        found = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not found or not all(Path(p).is_file() for p in found):
            raise FileNotFoundError(f"Corpus shard {pattern!r} does not exist (or matches no file)")
        paths += found
    kinds = {BUILDERS.get(Path(p).suffix.lower()) for p in paths}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"corpus shards must all be plain text (.txt), JSONL (.jsonl/.json) or parquet (.parquet), "
                        f"one kind; got {sorted({Path(p).suffix or p for p in paths})}")
    return paths


def load_documents(paths: list[str], text_column: str, cache_dir: str | None) -> datasets.Dataset:
    """One row per document, with the text in ``text_column`` (``text`` for plain text files)."""
    builder = BUILDERS[Path(paths[0]).suffix.lower()]
    extra = {"sample_by": "paragraph"} if builder == "text" else {}
    with quiet_progress():
        docs = datasets.load_dataset(builder, data_files=paths, split="train", cache_dir=cache_dir, **extra)
    column = "text" if builder == "text" else text_column
    if column not in docs.column_names:
        raise DataError(f"{paths[0]}: no column {column!r} in the corpus (found {docs.column_names}); set "
                        "text_column")
    return docs.select_columns([column])


def _pack(batch: dict, indices: list[int], *, tokenizer: PreTrainedTokenizerBase, column: str, block: int,
          name: str) -> dict:
    texts = batch[column]
    for i, text in zip(indices, texts, strict=True):
        if not isinstance(text, str):
            raise DataError(f"{name} document {i}: column {column!r} must be a string, got {type(text).__name__}")
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + [tokenizer.eos_token_id]
    return {"input_ids": [stream[k:k + block] for k in range(0, len(stream) - block + 1, block)]}


def pack_documents(select: Callable[[], datasets.Dataset], tokenizer: PreTrainedTokenizerBase, max_length: int,
                   key: dict, num_proc: int, cache_dir: str | None, name: str) -> datasets.Dataset:
    """Blocks of ``max_length`` tokens from the documents ``select()`` gives (the tail of each 1,000 documents that
    fills no block is dropped), cached under a fingerprint of ``key``, the tokenizer and the settings; when the
    blocks are cached, the documents are not selected at all."""
    blob = json.dumps({**key, "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length,
                       "num_proc": num_proc, "version": PACKING_VERSION}, sort_keys=True)
    fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:32]
    folder = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "layerwise_packed"
    folder.mkdir(parents=True, exist_ok=True)
    cached = folder / f"{fingerprint}.arrow"
    if cached.is_file():
        return datasets.Dataset.from_file(str(cached))
    docs = select()
    with quiet_progress():
        return docs.map(_pack, batched=True, batch_size=1000, with_indices=True, remove_columns=docs.column_names,
                        fn_kwargs={"tokenizer": tokenizer, "column": docs.column_names[0], "block": max_length,
                                   "name": name},
                        num_proc=num_proc if num_proc > 1 and len(docs) >= num_proc else None,
                        cache_file_name=str(cached), new_fingerprint=fingerprint,
                        load_from_cache_file=True)


def write_synthetic_corpus(directory: Path, n: int, seed: int, tasks: tuple[str, ...]) -> None:
    """The synthetic problems as a plain text corpus: one paragraph (question, answer) per problem."""
    text = "\n\n".join(f"{p.question}\n{p.answer}" for p in make_problems(n, seed, tasks))
    (directory / "corpus.txt").write_text(text + "\n")


def collate_blocks(blocks: list[dict]) -> dict[str, torch.Tensor]:
    """Blocks as ``input_ids`` with every token trained (``labels``) and attended."""
    ids = torch.tensor([b["input_ids"] for b in blocks], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class TextCorpusDataModule(L.LightningDataModule):
    """Causal-LM pre-training on a corpus of text shards, packed into blocks of ``max_length`` tokens.

    Args:
        files: shards (paths or glob patterns) of one kind: plain text (``.txt``; documents are paragraphs),
            JSONL or parquet (documents are rows). ``None`` writes the built-in synthetic tasks as a plain text
            corpus to ``synthetic_dir``.
        text_column: the column holding a document's text (JSONL and parquet shards).
        tokenizer: a local Hugging Face tokenizer directory, or ``"char"`` for the built-in one.
        max_length: tokens per block.
        batch_size: blocks per device batch.
        val_fraction: share of the documents held out for validation (seeded).
        seed: seed of the document split and the training order.
        synthetic_dir / synthetic_train_size / synthetic_tasks: the built-in corpus and its number of problems.
        num_proc: processes that tokenize and pack (``datasets.map``); the blocks are cached and reused.
        cache_dir: where converted and packed data are cached; ``None`` is the ``datasets`` cache.
        num_workers: DataLoader worker processes.
    """

    defining_settings: frozenset[str] = frozenset({"tokenizer"})

    def __init__(
        self,
        files: list[str] | None = None,
        text_column: str = "text",
        tokenizer: str = CHAR_TOKENIZER,
        max_length: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        seed: int = 0,
        synthetic_dir: str = "data/synthetic",
        synthetic_train_size: int = 4000,
        synthetic_tasks: tuple[str, ...] = TASKS,
        num_proc: int = 1,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if max_length < 2 or batch_size < 1 or num_proc < 1 or num_workers < 0:
            raise ValueError(f"expected max_length >= 2, batch_size >= 1, num_proc >= 1 and num_workers >= 0; got "
                             f"max_length={max_length}, batch_size={batch_size}, num_proc={num_proc}, "
                             f"num_workers={num_workers}")
        if files is not None and (isinstance(files, str) or not files):
            raise ValueError(f"files is a non-empty list of shard paths or glob patterns, got {files!r}")
        unknown = set(synthetic_tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"Unknown synthetic_tasks {sorted(unknown)}; expected a subset of {TASKS}")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"The tokenizer {tokenizer!r} has no end-of-text token to separate documents")
        self.datasets: dict[str, datasets.Dataset] = {}

    def _synthetic_key(self) -> dict:
        hp = self.hparams
        return {"n": hp.synthetic_train_size, "seed": hp.seed, "tasks": list(hp.synthetic_tasks)}

    def shards(self) -> list[str]:
        """The corpus shards: ``files`` expanded, or the synthetic corpus."""
        hp = self.hparams
        if hp.files is None:
            return [str(keyed_dir(hp.synthetic_dir, "corpus", self._synthetic_key()) / "corpus.txt")]
        return shard_paths(list(hp.files))

    def prepare_data(self) -> None:
        """Write the synthetic corpus when it is used, then pack once (on one process per node), so that every
        rank's ``setup`` opens the cached blocks."""
        hp = self.hparams
        if hp.files is None:
            generate_once(hp.synthetic_dir, "corpus", self._synthetic_key(),
                          lambda d: write_synthetic_corpus(d, hp.synthetic_train_size, hp.seed,
                                                           tuple(hp.synthetic_tasks)))
        self._splits()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.datasets, docs = self._splits()
        rank_zero_info(f"Text corpus: {docs} documents; blocks of {self.hparams.max_length} tokens: "
                       + ", ".join(f"{k} {len(v)}" for k, v in self.datasets.items()))

    def _splits(self) -> tuple[dict[str, datasets.Dataset], int]:
        """The packed train and val blocks (from the cache when packed before), and the number of documents."""
        hp = self.hparams
        splits = {}
        paths = self.shards()
        docs = load_documents(paths, hp.text_column, hp.cache_dir)
        name = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} shards)"
        parts = {}

        def select(split: str) -> datasets.Dataset:
            if not parts:
                train, val = holdout_indices(len(docs), hp.val_fraction, hp.seed, name)
                parts.update(train=train, val=val)
            return docs.select(parts[split])

        for split in ("train", "val"):
            key = {"docs": docs._fingerprint, "shards": [[p, Path(p).stat().st_size, Path(p).stat().st_mtime_ns]
                                                         for p in paths],
                   "split": split, "seed": hp.seed, "val_fraction": hp.val_fraction}
            splits[split] = pack_documents(lambda split=split: select(split), self.tokenizer, hp.max_length, key,
                                           hp.num_proc, hp.cache_dir, name)
            if len(splits[split]) == 0:
                raise DataError(f"{name}: the {split} documents hold fewer than max_length="
                                f"{hp.max_length} tokens, so they make no block; add text or lower max_length")
        return splits, len(docs)

    def _loader(self, split: str) -> DataLoader:
        dataset, batch_size = self.datasets[split], self.hparams.batch_size
        sampler = resumable_sampler(dataset, self.trainer, batch_size, self.hparams.seed) if split == "train" else None
        return data_loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.hparams.num_workers,
                           collate_fn=collate_blocks)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")
