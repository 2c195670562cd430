"""Verifiable-QA records from any source: checked, their prompts rendered and tokenized once.

Two forms (one per source), after ``columns`` renamed the data's column names:
- GSM8K form: ``{"question": ..., "answer": "... #### 72"}``; the reference is the number after ``####``,
  checked at load with the reward's own parser: thousands commas, a currency sign, a percent sign and unit words
  are dropped (``#### 18 dollars`` -> ``18``), a fraction ``a/b`` is kept as its value; anything else (``3 or 4``)
  is an error naming the file and line (or row), since no completion could ever match it.
- QA form: ``{"question": ..., "answers": ["Paris", "paris, france"]}``; any accepted answer counts.

``encode_verifiable`` runs the check, the chat rendering and the tokenization through ``datasets.map`` into an
arrow file keyed by a fingerprint of the source, the tokenizer and the settings (as ``instruction_records`` does
for instruction data); the result is memory-mapped and the next start with the same data and settings opens it.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from datamodules.chat_encoding import encode_prompt
from datamodules.instruction_records import QUIET_BELOW, _cache_folder, _source_files, tokenizer_fingerprint
from datamodules.jsonl_records import DataError, field_text
from datamodules.record_forms import rename_columns
from datamodules.record_sources import DatasetSpec, RecordSource, load_source, quiet_progress
from datamodules.rewards import normalize_reference

ENCODING_VERSION = 1  # bump when the encoding changes, so cached tokenizations are rebuilt


def verifiable_row(record: dict, where: str, data_format: str = "auto", form: str | None = None,
                   columns: dict[str, str] | None = None) -> tuple[str, dict]:
    """``(form, {"question", "answer" | "answers"})`` of one record; ``form`` is the source's form so far
    (``None`` before its first record). Every problem is a ``DataError`` naming ``where``."""
    record = rename_columns(record, columns)
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field 'question' must be a non-empty string")
    this = "qa" if "answers" in record else "gsm8k" if "answer" in record else None
    if data_format != "auto" and this != data_format:
        column = "answers" if data_format == "qa" else "answer"
        raise DataError(f"{where}: data_format={data_format!r} needs column {column!r}; got fields {sorted(record)}")
    if this is None:
        raise DataError(f"{where}: expected 'answer' (GSM8K form, ending '#### <number>') or 'answers' "
                        f"(QA form, a list of accepted answers); got fields {sorted(record)}")
    if form is not None and this != form:
        raise DataError(f"{where}: record is in {this} form but the file started in {form} form; use one form")
    if this == "gsm8k":
        reference = field_text(record["answer"])
        if reference is None or "####" not in reference:
            raise DataError(f"{where}: 'answer' must end with '#### <number>' (GSM8K form), got {record['answer']!r}")
        try:
            number = normalize_reference(reference.rsplit("####", 1)[1])
        except ValueError as err:
            raise DataError(f"{where}: 'answer': {err}; no completion could match it. Write one number after "
                            "'####'") from err
        return this, {"question": question, "answer": number}
    answers = record["answers"]
    texts = [field_text(a) for a in answers] if isinstance(answers, list) else []
    if not texts or any(t is None or not t.strip() for t in texts):
        raise DataError(f"{where}: 'answers' must be a non-empty list of strings, none blank; got {answers!r}")
    return this, {"question": question, "answers": texts}


def read_verifiable_file(path: str | Path | DatasetSpec, data_format: str = "auto",
                         columns: dict[str, str] | None = None,
                         cache_dir: str | None = None) -> tuple[str, list[tuple[str, dict]]]:
    """``(form, [(where, row)])`` of a GSM8K-form or QA-form source, as Python lists (for small sources)."""
    rows, form = [], None
    source = load_source(path, cache_dir)
    if len(source) == 0:
        raise DataError(f"{source.name}: the file has no records (empty split)")
    for where, record in source.records():
        form, row = verifiable_row(record, where, data_format, form, columns)
        rows.append((where, row))
    return form, rows


def prompt_messages(question: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The chat a question is asked in: an optional system message, the question, the assistant's turn."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]


def _encode_rows(batch: dict, indices: list[int], *, name: str, json_text: bool, form: str,
                 tokenizer: PreTrainedTokenizerBase, system_prompt: str | None, max_prompt_length: int,
                 data_format: str, columns: dict[str, str] | None) -> dict:
    reference = "answer" if form == "gsm8k" else "answers"
    out: dict[str, list] = {"prompt_ids": [], "prompt": [], reference: []}
    keys = list(batch)
    for index, values in zip(indices, zip(*batch.values(), strict=True), strict=True):
        where, record = RecordSource.row_record(dict(zip(keys, values, strict=True)), index, name, json_text)
        _, row = verifiable_row(record, where, data_format, form, columns)
        messages = prompt_messages(row["question"], system_prompt)
        ids = encode_prompt(tokenizer, messages, where)
        if len(ids) > max_prompt_length:
            raise DataError(f"{where}: the prompt is {len(ids)} tokens, more than max_prompt_length="
                            f"{max_prompt_length}; raise it or shorten the question")
        out["prompt_ids"].append(ids)
        out["prompt"].append(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True))
        out[reference].append(row[reference])
    return out


def encode_verifiable(source: RecordSource, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int,
                      system_prompt: str | None = None, data_format: str = "auto",
                      columns: dict[str, str] | None = None, num_proc: int | None = None,
                      cache_dir: str | None = None) -> tuple[str, datasets.Dataset]:
    """``(form, rows)``: ``prompt_ids``, ``prompt`` (the rendered text) and the reference (``answer`` or
    ``answers``) of every record, checked and tokenized once; the arrow file is reused while the source, the
    tokenizer and these settings stay the same. The form is the first record's (or ``data_format``)."""
    if len(source) == 0:
        raise DataError(f"{source.name}: the file has no records (empty split)")
    where, first = source.record(source.dataset[0], 0)
    form, _ = verifiable_row(first, where, data_format, None, columns)
    key = json.dumps({"source": source.dataset._fingerprint, "files": _source_files(source), "name": source.name,
                      "tokenizer": tokenizer_fingerprint(tokenizer), "max_prompt_length": max_prompt_length,
                      "system_prompt": system_prompt, "data_format": data_format, "columns": columns, "form": form,
                      "version": ENCODING_VERSION}, sort_keys=True)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
    kwargs = {"name": source.name, "json_text": source.json_text, "form": form, "tokenizer": tokenizer,
              "system_prompt": system_prompt, "max_prompt_length": max_prompt_length, "data_format": data_format,
              "columns": columns}
    with quiet_progress() if len(source) < QUIET_BELOW else nullcontext():
        rows = source.dataset.map(
            _encode_rows, batched=True, with_indices=True, fn_kwargs=kwargs, remove_columns=source.dataset.column_names,
            num_proc=num_proc if num_proc and num_proc > 1 and len(source) >= num_proc else None,
            cache_file_name=str(_cache_folder(cache_dir) / f"verifiable-{fingerprint}.arrow"),
            new_fingerprint=fingerprint, load_from_cache_file=True, desc="Tokenizing prompts")
    return form, rows
