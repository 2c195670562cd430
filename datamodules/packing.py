"""Packing for supervised fine-tuning: whole tokenized examples placed side by side in rows of ``max_length``.

A packed row holds several examples; its ``position_ids`` restart at 0 at each example, and the model is called
without an ``attention_mask``, from which Hugging Face transformers builds a mask that keeps attention inside each
example (``masking_utils.find_packed_sequence_indices`` for sdpa / eager / flex; flash attention reads the same
restarts from ``position_ids`` when the batch is one row, see ``recipes.causal_lm``). The label of each example's
first token is masked, so no loss flows from the end of one example to the start of the next: the loss of every
example equals its unpacked loss. Rows are filled first-fit decreasing (deterministic), which leaves little padding
on the long-tailed length distributions of real instruction data.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from datamodules.chat_encoding import IGNORE_INDEX, pad


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices of the examples in each row, first-fit decreasing: the longest example first, each into the
    fullest row it still fits (ties by index, so the same lengths always give the same rows)."""
    too_long = [i for i, n in enumerate(lengths) if n > max_length or n < 1]
    if too_long:
        i = too_long[0]
        raise ValueError(f"example {i} has {lengths[i]} tokens; packing needs 1 to max_length={max_length}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: the fullest row that fits is found by bisect
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (max_length - lengths[i], len(rows) - 1))
            continue
        room, row = free.pop(k)
        rows[row].append(i)
        bisect.insort(free, (room - lengths[i], row))
    return rows


def example_lengths(dataset) -> list[int]:
    """Token counts of a tokenized ``datasets.Dataset`` (read from Arrow, without decoding the ids)."""
    column = dataset.with_format("arrow")[:]["input_ids"]
    return pc.list_value_length(column).to_pylist()


class PackedDataset(Dataset):
    """Rows of several examples of a tokenized data set (``input_ids`` / ``labels``), with ``position_ids``
    restarting per example and the label of each example's first token masked.

    Args:
        dataset: tokenized examples, each at most ``max_length`` tokens.
        max_length: tokens per row.
    """

    def __init__(self, dataset, max_length: int) -> None:
        self.dataset = dataset
        self.max_length = max_length
        self.rows = pack_rows(example_lengths(dataset), max_length)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        examples = self.dataset[self.rows[index]]
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for ids, labels in zip(examples["input_ids"], examples["labels"], strict=True):
            row["input_ids"] += ids
            row["labels"] += [IGNORE_INDEX] + list(labels[1:])  # nothing is learnt across the boundary
            row["position_ids"] += list(range(len(ids)))
        return row


def collate_packed(rows: list[dict], pad_token_id: int) -> dict:
    """Right-padded ``input_ids`` / ``labels`` / ``position_ids`` and no ``attention_mask`` (the position restarts
    define it); the padding continues as one more sequence whose labels are ignored. ``num_tokens`` counts each
    row's tokens that are not padding (they lead the row)."""
    return {
        "input_ids": pad([r["input_ids"] for r in rows], pad_token_id),
        "labels": pad([r["labels"] for r in rows], IGNORE_INDEX),
        "position_ids": _pad_positions([r["position_ids"] for r in rows]),
        "num_tokens": torch.tensor([len(r["input_ids"]) for r in rows]),
    }


def _pad_positions(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + list(range(width - len(r))) for r in rows], dtype=torch.long)
