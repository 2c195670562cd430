"""Where text records come from: any file or folder the ecosystem stores data in, or a data set by name, loaded
through Hugging Face ``datasets`` into a memory-mapped ``Dataset``.

Accepted sources (the format is told from the file's contents first, then its name):

- JSONL (``.jsonl``, ``.ndjson``, or ``.json`` whose first character is ``{``) and a JSON array file (``[...]``,
  e.g. the original ``alpaca_data.json``): read by our own reader, so errors name the file and line (JSONL) or
  row (array) and records may mix value types (``"input": 0`` next to ``"input": "x"``). Each record is stored as
  its JSON text beside where it came from.
- parquet, arrow (``datasets``' own files), CSV/TSV (every cell read as text, empty cells as empty strings), and a
  folder written with ``save_to_disk``: their columns as they are; errors name the source and the row index.
- a data set by name (``DatasetSpec``): ``load_dataset(name, subset, split=..., revision=...)``, which reads the
  local Hugging Face cache when ``HF_HUB_OFFLINE=1`` and downloads only when the network is allowed. A local folder
  of data files (a data set repository cloned by hand) is loaded the same way.

Every source is converted once into the ``datasets`` cache and reused on the next start (a file's cache entry is
keyed by its path, size and modification time).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError

from datamodules.jsonl_records import DataError, read_utf8

READER_VERSION = 1  # bump when what the JSON readers store changes, so cached conversions are rebuilt
JSON_FEATURES = datasets.Features({"where": datasets.Value("string"), "json": datasets.Value("string")})
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow",
            ".csv": "csv", ".tsv": "tsv"}


@dataclass(frozen=True)
class DatasetSpec:
    """A data set by name (a Hugging Face Hub id or a local data set folder), one of its splits."""

    name: str
    split: str = "train"
    subset: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        parts = [self.name] + [f"{k}={v}" for k, v in (("subset", self.subset), ("revision", self.revision)) if v]
        return f"data set {':'.join(parts)} split {self.split!r}"


@dataclass
class RecordSource:
    """A loaded source: its rows, a name for error messages, and whether rows are JSON text (``where``/``json``)."""

    dataset: datasets.Dataset
    name: str
    json_text: bool

    def __len__(self) -> int:
        return len(self.dataset)

    def record(self, row: dict, index: int) -> tuple[str, dict]:
        """``(where, record)`` of row ``index``."""
        return self.row_record(row, index, self.name, self.json_text)

    @staticmethod
    def row_record(row: dict, index: int, name: str, json_text: bool) -> tuple[str, dict]:
        """``(where, record)`` of one row; ``None`` values of columnar sources count as absent fields."""
        if not json_text:
            return f"{name} row {index}", {k: v for k, v in row.items() if v is not None}
        where = row["where"]
        try:
            record = json.loads(row["json"])
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        return where, record

    def records(self) -> Iterator[tuple[str, dict]]:
        """Every ``(where, record)`` in order."""
        for i, row in enumerate(self.dataset):
            yield self.record(row, i)


@contextmanager
def quiet_progress():
    """No ``datasets`` progress bars while loading (the console stays clean); the previous setting comes back."""
    was_disabled = datasets.utils.logging.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _leading_bytes(path: Path, n: int = 8) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


def _first_text_char(path: Path) -> str | None:
    """The first character of a text file that is not whitespace or a byte-order mark; ``None`` for a blank file."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            stripped = chunk.lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
            if stripped:
                return chr(stripped[0])
    return None


def file_format(path: Path) -> str:
    """``jsonl``, ``json``, ``parquet``, ``arrow``, ``csv``, ``tsv`` or ``save_to_disk``, from contents and name."""
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "save_to_disk"
        return "folder"
    head = _leading_bytes(path)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff"):
        return "arrow"
    by_name = SUFFIXES.get(path.suffix.lower())
    if by_name in ("parquet", "arrow"):
        raise DataError(f"{path}: named {path.suffix} but its contents are not {by_name} (starts with {head!r})")
    if by_name in ("csv", "tsv", "jsonl"):
        return by_name
    first = _first_text_char(path)
    if first is None:
        return by_name or "jsonl"  # a blank file: the JSON readers report it as having no records
    if first == "[":
        return "json"
    if first == "{":
        return "jsonl"
    raise DataError(f"{path}: cannot tell the data format from the name (suffix {path.suffix or 'none'!r}) or the "
                    f"contents (starts with {head!r}); use JSONL, a JSON array, parquet, arrow, CSV/TSV or a "
                    "save_to_disk folder")


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                        "save the file as UTF-8") from err


def _jsonl_rows(path: str, size: int, mtime_ns: int, version: int) -> Iterator[dict]:
    """Rows of a JSONL file (blank lines skipped); ``size``/``mtime_ns``/``version`` only key the cache."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_line(raw, Path(path), lineno)
            if line.strip():
                yield {"where": f"{path}:{lineno}", "json": line}


def _json_array_rows(path: str, size: int, mtime_ns: int, version: int) -> Iterator[dict]:
    """Rows of a JSON array file, each record as its JSON text; errors name the line and column of the file."""
    text = read_utf8(path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of records or JSON lines, got a {type(records).__name__}")
    for i, record in enumerate(records):
        yield {"where": f"{path} row {i}", "json": json.dumps(record, ensure_ascii=False)}


def _text_columns(path: Path, sep: str) -> datasets.Features:
    """Every column of a CSV/TSV file read as text (so ``007`` stays ``007`` and ``3.50`` stays ``3.50``)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        try:
            header = next(csv.reader(f, delimiter=sep), [])
        except UnicodeDecodeError:
            read_utf8(path)  # raises, naming the line and byte
            raise
    return datasets.Features({name: datasets.Value("string") for name in header})


def _load_json_text(path: Path, form: str, cache_dir: str | None) -> datasets.Dataset:
    if _first_text_char(path) is None:
        raise DataError(f"{path}: the file has no records (empty split)")
    stat = path.stat()
    kwargs = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "version": READER_VERSION}
    key = hashlib.sha256(json.dumps({"form": form, **kwargs}, sort_keys=True).encode()).hexdigest()[:32]
    generator = _jsonl_rows if form == "jsonl" else _json_array_rows
    try:
        dataset = datasets.Dataset.from_generator(generator, features=JSON_FEATURES, gen_kwargs=kwargs,
                                                  cache_dir=cache_dir, fingerprint=key)
    except DatasetGenerationError as err:
        if isinstance(err.__cause__, DataError):
            raise err.__cause__ from None
        raise
    except ValueError as err:  # a JSON array without records
        if "corresponds to no data" in str(err):
            raise DataError(f"{path}: the file has no records (empty split)") from None
        raise
    return dataset


def _single(loaded, where: str, split: str | None) -> datasets.Dataset:
    """The one split of a loaded ``Dataset`` or ``DatasetDict``; a missing split is an error listing those found."""
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split in loaded:
        return loaded[split]
    if split is None and len(loaded) == 1:
        return next(iter(loaded.values()))
    raise DataError(f"{where}: no split {split or 'train'!r}; found splits {sorted(loaded)}")


def load_source(source: str | Path | DatasetSpec, cache_dir: str | None = None) -> RecordSource:
    """Load a file, a folder or a named data set as rows (see the module docstring for what is accepted)."""
    with quiet_progress():
        if isinstance(source, DatasetSpec):
            return RecordSource(_load_named(source, cache_dir), str(source), json_text=False)
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"Data file {path} does not exist")
        form = file_format(path)
        if form in ("jsonl", "json"):
            return RecordSource(_load_json_text(path, form, cache_dir), str(path), json_text=True)
        if form == "save_to_disk":
            loaded = datasets.load_from_disk(str(path))
            split = "train" if isinstance(loaded, datasets.DatasetDict) and "train" in loaded else None
            return RecordSource(_single(loaded, str(path), split), str(path), json_text=False)
        if form == "folder":
            return RecordSource(_load_named(DatasetSpec(str(path)), cache_dir), str(path), json_text=False)
        builder, extra = form, {}
        if form in ("csv", "tsv"):
            sep = "\t" if form == "tsv" else ","
            builder, extra = "csv", {"sep": sep, "keep_default_na": False, "features": _text_columns(path, sep)}
        try:
            loaded = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **extra)
        except (DatasetGenerationError, ValueError, OSError) as err:
            if form in ("csv", "tsv"):
                read_utf8(path)  # a text file that is not UTF-8: the error names the line and byte
            raise DataError(f"{path}: cannot be read as {form} ({err.__cause__ or err})") from err
        return RecordSource(loaded, str(path), json_text=False)


def _load_named(spec: DatasetSpec, cache_dir: str | None) -> datasets.Dataset:
    try:
        loaded = datasets.load_dataset(spec.name, spec.subset, revision=spec.revision, cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError) as err:
        raise FileNotFoundError(f"{spec}: not found locally or in the Hugging Face cache ({err}); without network "
                                "(HF_HUB_OFFLINE=1) a data set loads only from a local folder or the cache") from err
    except ValueError as err:
        raise DataError(f"{spec}: {err}") from err
    return _single(loaded, str(spec), spec.split)
