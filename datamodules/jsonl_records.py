"""What every text data reader shares: ``DataError``, strict UTF-8 reading, and text fields that may be numbers.

The readers themselves are ``record_sources`` (files, folders, data sets by name) and ``record_forms`` (the record
forms turned into chat messages)."""

from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message names the file and line (or row) and what was expected."""


def read_utf8(path: str | Path) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped); other bytes are a ``DataError`` naming the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); save the "
                        "file as UTF-8") from err


def field_text(value) -> str | None:
    """A text field's value: a string as is, a number (``0`` included) as its JSON text, anything else ``None``."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return json.dumps(value)
    return None
