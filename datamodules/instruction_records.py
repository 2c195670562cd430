"""Instruction records from any source, normalized to chat messages and tokenized once.

``encode_source`` runs the normalization and tokenization through ``datasets.map`` (``num_proc`` workers) into an
arrow file keyed by a fingerprint of the source, the tokenizer and the settings; the result is memory-mapped, and a
second start with the same data, tokenizer and settings opens that file instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from datamodules.chat_encoding import encode_chat, encode_prompt
from datamodules.holdout import holdout_indices
from datamodules.record_forms import record_to_messages
from datamodules.record_sources import DatasetSpec, RecordSource, load_source, quiet_progress

ENCODING_VERSION = 1  # bump when the encoding changes, so cached tokenizations are rebuilt
QUIET_BELOW = 50_000  # sources with fewer records are tokenized without a progress bar


def read_instruction_file(source: str | Path | DatasetSpec, data_format: str = "auto",
                          columns: dict[str, str] | None = None) -> list[tuple[str, list[dict[str, str]]]]:
    """``(where, messages)`` for every record of a source (a small one: the records become a Python list)."""
    return [(where, record_to_messages(record, where, data_format, columns))
            for where, record in load_source(source).records()]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything about a tokenizer that changes token ids: vocabulary, rules, specials, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    core = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    blob = json.dumps([type(tokenizer).__name__, core, tokenizer.chat_template, tokenizer.all_special_tokens,
                       tokenizer.pad_token_id], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_folder(cache_dir: str | None) -> Path:
    folder = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "layerwise_tokenized"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def split_once(encoded: datasets.Dataset, fraction: float, seed: int, source: str,
               cache_dir: str | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(train, val)`` with a seeded ``fraction`` held out (``holdout_split``), written once as two arrow files,
    so the next start opens them instead of holding an index per record in memory."""
    key = hashlib.sha256(json.dumps([encoded._fingerprint, fraction, seed]).encode()).hexdigest()[:32]
    paths = [_cache_folder(cache_dir) / f"{key}-{split}.arrow" for split in ("train", "val")]
    if all(p.is_file() for p in paths):
        return datasets.Dataset.from_file(str(paths[0])), datasets.Dataset.from_file(str(paths[1]))
    parts = holdout_indices(len(encoded), fraction, seed, source)
    with quiet_progress():
        return tuple(encoded.select(rows).flatten_indices(cache_file_name=str(path))  # type: ignore[return-value]
                     for rows, path in zip(parts, paths, strict=True))


def _source_files(source: RecordSource) -> list:
    files = []
    for entry in source.dataset.cache_files:
        stat = os.stat(entry["filename"])
        files.append([entry["filename"], stat.st_size, stat.st_mtime_ns])
    return files


def _encode_rows(batch: dict, indices: list[int], *, name: str, json_text: bool, tokenizer: PreTrainedTokenizerBase,
                 max_length: int, data_format: str, columns: dict[str, str] | None) -> dict:
    out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_ids": [], "answer": []}
    keys = list(batch)
    for index, values in zip(indices, zip(*batch.values(), strict=True), strict=True):
        where, record = RecordSource.row_record(dict(zip(keys, values, strict=True)), index, name, json_text)
        messages = record_to_messages(record, where, data_format, columns)
        example = encode_chat(tokenizer, messages, max_length, where)
        out["input_ids"].append(example["input_ids"])
        out["labels"].append(example["labels"])
        out["prompt_ids"].append(encode_prompt(tokenizer, messages, where))
        out["answer"].append(messages[-1]["content"])
    return out


def encode_source(source: RecordSource, tokenizer: PreTrainedTokenizerBase, max_length: int,
                  data_format: str = "auto", columns: dict[str, str] | None = None, num_proc: int | None = None,
                  cache_dir: str | None = None) -> datasets.Dataset:
    """``input_ids``/``labels`` (loss on the responses) and ``prompt_ids``/``answer`` of every record, tokenized
    once: the arrow file is reused while the source, the tokenizer and these settings stay the same."""
    key = json.dumps({"source": source.dataset._fingerprint, "files": _source_files(source), "name": source.name,
                      "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length,
                      "data_format": data_format, "columns": columns, "version": ENCODING_VERSION}, sort_keys=True)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
    folder = _cache_folder(cache_dir)
    kwargs = {"name": source.name, "json_text": source.json_text, "tokenizer": tokenizer, "max_length": max_length,
              "data_format": data_format, "columns": columns}
    with quiet_progress() if len(source) < QUIET_BELOW else nullcontext():
        return source.dataset.map(
            _encode_rows, batched=True, with_indices=True, fn_kwargs=kwargs, remove_columns=source.dataset.column_names,
            num_proc=num_proc if num_proc and num_proc > 1 and len(source) >= num_proc else None,
            cache_file_name=str(folder / f"{fingerprint}.arrow"), new_fingerprint=fingerprint,
            load_from_cache_file=True, desc="Tokenizing")
