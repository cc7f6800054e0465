"""The document formats of raw data: what one file holds and how to read it, one document at a time.

A file is one of:
  text      any other name (.txt, .py, ...): the whole file is one document
  jsonl     .jsonl: one JSON object per line, its `text_field` is a document
  parquet   .parquet: each row's `text_field` column is a document
  arrow     .arrow: Arrow IPC (how `datasets.Dataset.save_to_disk` stores rows), as parquet
text and jsonl may be compressed: .gz (gzip) or .zst/.zstd (zstandard). Blank JSONL lines and empty
texts are skipped (they are counted, so document numbers stay line numbers); a line that is not
JSON, or has no string in the field, is an error naming file and line.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from typing import BinaryIO

from jaxlm.errors import UserError

COMPRESSIONS = (".gz", ".zst", ".zstd")
RECORD_BATCH = 1024  # parquet/arrow rows read at a time
LINE_BLOCK = 4 << 20  # bytes of JSONL lines parsed at a time


def compression(path: str) -> str | None:
    return next((c for c in COMPRESSIONS if path.endswith(c)), None)


def file_kind(path: str) -> str:
    """text, jsonl, parquet or arrow, from the name (after any compression suffix)."""
    c = compression(path)
    name = path[: -len(c)] if c else path
    kind = {".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}.get(os.path.splitext(name)[1], "text")
    if c and kind in ("parquet", "arrow"):
        raise UserError(f"{path}: a compressed .{kind} file cannot be read; {kind} files compress inside")
    return kind


def _optional(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = {"zstandard": "zstandard", "pyarrow": "pyarrow"}[module.split(".")[0]]
        raise UserError(f"reading {what} needs the {package} package: pip install 'jaxlm[data]' "
                        f"(or pip install {package})") from None


def open_binary(path: str) -> BinaryIO:
    """The file's bytes, decompressed as they are read."""
    c = compression(path)
    if c == ".gz":
        return gzip.open(path, "rb")
    if c in (".zst", ".zstd"):
        zstd = _optional("zstandard", f"{path} (zstandard-compressed)")
        return io.BufferedReader(zstd.ZstdDecompressor().stream_reader(
            open(path, "rb"), read_across_frames=True, closefd=True))
    return open(path, "rb")


def read_errors() -> tuple[type[Exception], ...]:
    """What reading a damaged or truncated file raises (gzip: OSError, EOFError; zstandard: its own)."""
    try:
        import zstandard

        return OSError, EOFError, zstandard.ZstdError
    except ImportError:
        return OSError, EOFError


def read_bytes(path: str) -> bytes:
    try:
        with open_binary(path) as f:
            return f.read()
    except read_errors() as e:
        raise UserError(f"{path}: cannot read it: {e}") from None


def decode_utf8(data: bytes, path: str, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: invalid UTF-8 at byte offset {offset + e.start}") from None


def jsonl_text(raw: str, path: str, line: int, field: str) -> str | None:
    """The document of one JSONL line; None for a blank line or an empty text."""
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except ValueError as e:
        raise UserError(f"{path}:{line}: invalid JSON ({getattr(e, 'msg', e)}); expected one JSON object "
                        "per line") from None
    value = record.get(field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        raise UserError(f"{path}:{line}: the record has no string field {field!r}; set data.text_field "
                        "(jaxlm prepare: --text-field) to the field that holds the text")
    return value or None


def jsonl_texts(data: bytes, path: str, first_line: int, field: str, offset: int = 0) -> list[str | None]:
    """The documents of whole JSONL lines (one entry per line, None where it is skipped)."""
    text = decode_utf8(data, path, offset)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [jsonl_text(raw, path, first_line + n, field) for n, raw in enumerate(lines)]


def iter_line_blocks(path: str, block_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(first line number, whole lines of about block_bytes) of a possibly compressed file."""
    line = 1
    try:
        with open_binary(path) as f:
            while block := f.read(block_bytes):
                if not block.endswith(b"\n"):
                    block += f.readline()
                yield line, block
                line += block.count(b"\n") + (not block.endswith(b"\n"))
    except read_errors() as e:
        raise UserError(f"{path}: cannot read it: {e}") from None


def _arrow_batches(path: str, field: str):
    """Record batches of the text column of a parquet or Arrow IPC file."""
    pa = _optional("pyarrow", path)
    if file_kind(path) == "parquet":
        pq = _optional("pyarrow.parquet", path)
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable parquet file ({e})") from None
        _check_column(path, pf.schema_arrow.names, field)
        yield from pf.iter_batches(batch_size=RECORD_BATCH, columns=[field])
        return
    source = pa.memory_map(path)
    try:
        reader = pa.ipc.open_stream(source)  # what datasets writes
    except pa.ArrowInvalid:
        try:
            reader = pa.ipc.open_file(source)
        except pa.ArrowInvalid as e:
            raise UserError(f"{path}: not a readable Arrow IPC file ({e})") from None
    _check_column(path, reader.schema.names, field)
    batches = reader if hasattr(reader, "read_next_batch") else (reader.get_batch(i) for i in range(reader.num_record_batches))
    for batch in batches:
        yield batch.select([field])


def _check_column(path: str, names: list[str], field: str) -> None:
    if field not in names:
        raise UserError(f"{path}: no column {field!r} (it has {', '.join(names) or 'none'}); set data.text_field "
                        "(jaxlm prepare: --text-field) to the column that holds the text")


def iter_rows(path: str, field: str) -> Iterator[list[str | None]]:
    """The documents of a parquet or Arrow file, a record batch at a time (None: skipped)."""
    row = 0
    for batch in _arrow_batches(path, field):
        values = batch.column(0).to_pylist()
        for i, v in enumerate(values):
            if not isinstance(v, str):
                got = "no text (null)" if v is None else f"a {type(v).__name__}"
                raise UserError(f"{path}: row {row + i} has {got} in column {field!r}; expected text")
        row += len(values)
        yield [v or None for v in values]


def iter_documents(path: str, field: str = "text") -> Iterator[str]:
    """Every non-empty document of one file, in order."""
    kind = file_kind(path)
    if kind == "text":
        if text := decode_utf8(read_bytes(path), path):
            yield text
    elif kind == "jsonl":
        for line, block in iter_line_blocks(path, LINE_BLOCK):
            yield from (t for t in jsonl_texts(block, path, line, field) if t is not None)
    else:
        for texts in iter_rows(path, field):
            yield from (t for t in texts if t is not None)


def saved_dataset_files(directory: str) -> list[str] | None:
    """The Arrow files of a `datasets.Dataset.save_to_disk` directory in row order; None if it is not
    one. A saved DatasetDict (several splits) is refused: training would mix its splits."""
    if os.path.isfile(os.path.join(directory, "dataset_dict.json")):
        try:
            with open(os.path.join(directory, "dataset_dict.json")) as f:
                splits = json.load(f).get("splits") or []
        except (OSError, ValueError, AttributeError):
            splits = []
        first = os.path.join(directory, splits[0]) if splits else os.path.join(directory, "train")
        raise UserError(f"{directory} is a saved DatasetDict with splits {', '.join(splits) or '?'}; give one "
                        f"split's directory, e.g. {first}")
    state = os.path.join(directory, "state.json")
    if not os.path.isfile(state):
        return None
    try:
        with open(state) as f:
            files = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # some other state.json: an ordinary directory
    return [os.path.join(directory, name) for name in files]
