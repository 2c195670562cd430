"""Hold out a seeded validation share of a training file's records."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TypeVar

from datamodules.jsonl_records import DataError

T = TypeVar("T")


def holdout_split(records: list[T], fraction: float, seed: int, source: str | Path) -> tuple[list[T], list[T]]:
    """``(train, val)``: a seeded ``fraction`` of ``records`` (at least one) held out, both in file order."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * fraction))
    if n_val >= len(records):
        raise DataError(f"{source}: {len(records)} records are too few to hold out a validation split")
    return [records[i] for i in sorted(order[n_val:])], [records[i] for i in sorted(order[:n_val])]


def holdout_indices(n: int, fraction: float, seed: int, source) -> tuple[list[int], list[int]]:
    """``(train, val)`` row indices of ``n`` records: the same split ``holdout_split`` makes, as indices."""
    return holdout_split(list(range(n)), fraction, seed, source)
