"""Read instruction JSONL (Alpaca, chat or GSM8K form) into chat messages, with errors that name file and line."""

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


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """All ``(line_number, record)`` pairs of a JSONL file; blank lines are allowed, anything else must parse."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist")
    rows = []
    for lineno, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        rows.append((lineno, record))
    if not rows:
        raise DataError(f"{path}: the file has no records (empty split)")
    return rows


def field_text(value) -> str | None:
    """A text field's value: a string as is, a number (``0`` included) as its JSON text, anything else ``None``."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return json.dumps(value)
    return None


def _require_str(record: dict, key: str, where: str) -> str:
    value = field_text(record.get(key))
    if value is None:
        raise DataError(f"{where}: field {key!r} must be a string (or a number), got "
                        f"{type(record.get(key)).__name__}")
    return value


def record_to_messages(record: dict, where: str) -> list[dict[str, str]]:
    """Normalize one record to chat messages ending with the assistant's response.

    Accepted forms: chat (``messages`` with ``role``/``content``), Alpaca (``instruction``, optional ``input``,
    ``output``) and GSM8K (``question``, ``answer``). A number in a text field is kept as its text (``"input": 0``
    gives the line ``0``); only an absent, ``null`` or empty ``input`` adds nothing.
    """
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
                raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; expected system, user or assistant")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's response")
        return [{"role": m["role"], "content": _require_str(m, "content", where)} for m in messages]
    if "instruction" in record:
        prompt = _require_str(record, "instruction", where)
        extra = "" if record.get("input") is None else _require_str(record, "input", where)
        if extra:
            prompt = f"{prompt}\n{extra}"
        return [{"role": "user", "content": prompt},
                {"role": "assistant", "content": _require_str(record, "output", where)}]
    if "question" in record:
        return [{"role": "user", "content": _require_str(record, "question", where)},
                {"role": "assistant", "content": _require_str(record, "answer", where)}]
    raise DataError(f"{where}: record has none of the expected fields: 'messages' (chat form), "
                    f"'instruction'/'output' (Alpaca form) or 'question'/'answer' (GSM8K form); got {sorted(record)}")


def read_instruction_file(path: str | Path) -> list[tuple[str, list[dict[str, str]]]]:
    """``(where, messages)`` for every record of an instruction JSONL file."""
    return [(f"{path}:{lineno}", record_to_messages(rec, f"{path}:{lineno}")) for lineno, rec in read_jsonl(path)]
