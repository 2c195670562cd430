"""The forms instruction records come in, each turned into chat messages ending with the assistant's response.

- ``messages`` (OpenAI chat): ``{"messages": [{"role": "user", "content": ...}, ...]}``
- ``sharegpt``: ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}``
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional)
- ``prompt_completion`` (TRL): ``{"prompt": ..., "completion": ...}``, strings or lists of messages
- ``gsm8k``: ``{"question": ..., "answer": ...}``

The form is told from the record's fields (``data_format="auto"``) or given. ``columns`` renames fields first
(``{"query": "instruction"}`` reads a ``query`` column as the Alpaca ``instruction``).
"""

from __future__ import annotations

from typing import Literal

from datamodules.jsonl_records import DataError, field_text

DataFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "gsm8k"]
DATA_FORMATS: tuple[str, ...] = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "gsm8k")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def check_format_args(data_format: str, columns: dict[str, str] | None) -> None:
    """Argument checks for a data module's ``__init__``."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    if columns is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise ValueError(f"columns maps a column name of the data to a field name (both strings), got {columns!r}")


def rename_columns(record: dict, columns: dict[str, str] | None) -> dict:
    """The record with fields renamed by ``columns`` (``{"question": "instruction"}``)."""
    if not columns:
        return record
    return {columns.get(k, k): v for k, v in record.items()}


def detect_format(record: dict) -> str | None:
    """The form a record's fields say it is in, or ``None``."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "question" in record:
        return "gsm8k"
    return None


def _require_str(record: dict, key: str, where: str) -> str:
    value = field_text(record.get(key))
    if value is None:
        raise DataError(f"{where}: field {key!r} must be a string (or a number), got "
                        f"{type(record.get(key)).__name__}")
    return value


def _chat(messages, where: str, field: str, role_key: str = "role", content_key: str = "content",
          roles: dict[str, str] | None = None) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {field!r} must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get(role_key) is None or role_key not in m or content_key not in m:
            raise DataError(f"{where}: {field}[{i}] must be an object with {role_key!r} and {content_key!r}")
        role = roles.get(m[role_key]) if roles else m[role_key]
        if role not in ("system", "user", "assistant"):
            expected = ", ".join(roles) if roles else "system, user or assistant"
            raise DataError(f"{where}: {field}[{i}] has {role_key} {m[role_key]!r}; expected {expected}")
        out.append({"role": role, "content": _require_str(m, content_key, f"{where}: {field}[{i}]")})
    return out


def _end_with_response(messages: list[dict], where: str) -> list[dict]:
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's response")
    return messages


def _prompt_completion(record: dict, where: str) -> list[dict[str, str]]:
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list):
        messages = _chat(prompt, where, "prompt")
    else:
        messages = [{"role": "user", "content": _require_str(record, "prompt", where)}]
    if isinstance(completion, list):
        messages += _chat(completion, where, "completion")
    else:
        messages.append({"role": "assistant", "content": _require_str(record, "completion", where)})
    return messages


def record_to_messages(record: dict, where: str, data_format: str = "auto",
                       columns: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Normalize one record to chat messages ending with the assistant's response.

    A number in a text field is kept as its text (``"input": 0`` gives the line ``0``); only an absent, ``null`` or
    empty ``input`` adds nothing. Errors name ``where`` (file and line, or source and row) and the field.
    """
    record = rename_columns(record, columns)
    form = detect_format(record) if data_format == "auto" else data_format
    if form == "messages":
        messages = _chat(record.get("messages"), where, "messages")
    elif form == "sharegpt":
        messages = _chat(record.get("conversations"), where, "conversations", "from", "value", SHAREGPT_ROLES)
    elif form == "alpaca":
        prompt = _require_str(record, "instruction", where)
        extra = "" if record.get("input") is None else _require_str(record, "input", where)
        if extra:
            prompt = f"{prompt}\n{extra}"
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _require_str(record, "output", where)}]
    elif form == "prompt_completion":
        messages = _prompt_completion(record, where)
    elif form == "gsm8k":
        messages = [{"role": "user", "content": _require_str(record, "question", where)},
                    {"role": "assistant", "content": _require_str(record, "answer", where)}]
    else:
        raise DataError(f"{where}: record has none of the expected fields: 'messages' (chat form), 'conversations' "
                        "(ShareGPT form), 'instruction'/'output' (Alpaca form), 'prompt'/'completion' (TRL form) "
                        f"or 'question'/'answer' (GSM8K form); got {sorted(record)}. Map other names with columns:")
    return _end_with_response(messages, where)
