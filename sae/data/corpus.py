"""Reading corpus files into documents: JSONL (a named field), Parquet (a named column) or plain
text (blank-line separated).

Records that are not valid UTF-8 or JSON (or, in Parquet, null or not text) are reported with
their file and line (a Parquet file's row), so that a caller can either stop with a one-line
error or count and skip them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from sae.errors import InputError
from sae.io import storage


class BadRecordError(InputError):
    """A corpus record that cannot be decoded."""


@dataclass(frozen=True)
class Record:
    """One document, or the reason it could not be read (then `text` is None)."""

    uri: str
    line: int
    text: str | None
    problem: str = ""


def find_corpus_files(pattern: str) -> list[str]:
    """Every file matched by a URI, glob, directory, or comma-separated list of them; error
    when none."""
    files = storage.match_files(pattern)
    if not files:
        raise InputError(f"no corpus files match '{pattern}'")
    return files


def read_records(uri: str, fmt: str, text_field: str = "text") -> Iterator[Record]:
    """Documents of one corpus file, streamed line by line (Parquet: batch by batch)."""
    if fmt == "jsonl":
        yield from _jsonl_records(uri, text_field)
    elif fmt == "parquet":
        yield from _parquet_records(uri, text_field)
    elif fmt == "text":
        yield from _text_records(uri)
    else:
        raise InputError(f"unknown corpus format '{fmt}'")


def _lines(uri: str) -> Iterator[tuple[int, bytes]]:
    with storage.open_read(uri) as handle:
        for number, raw in enumerate(handle, start=1):
            yield number, raw.rstrip(b"\r\n")


def _jsonl_records(uri: str, text_field: str) -> Iterator[Record]:
    for number, raw in _lines(uri):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield Record(uri, number, None, "is not valid UTF-8")
            continue
        except json.JSONDecodeError:
            yield Record(uri, number, None, "is not valid JSON")
            continue
        if not isinstance(obj, dict) or text_field not in obj:
            yield Record(uri, number, None, f"has no field '{text_field}'")
        elif not isinstance(obj[text_field], str):
            yield Record(uri, number, None, f"field '{text_field}' is not a string")
        else:
            yield Record(uri, number, obj[text_field])


def _parquet_records(uri: str, column: str) -> Iterator[Record]:
    with storage.open_read(uri) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowInvalid, OSError) as error:
            raise InputError(f"{uri} is not a Parquet file: {_first_line(error)}") from None
        schema = parquet.schema_arrow
        if column not in schema.names:
            names = ", ".join(schema.names)
            raise InputError(f"{uri} has no column '{column}' (it has: {names})")
        kind = schema.field(column).type
        is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        row = 0
        # Batches keep memory bounded whatever the file's size; only the one column is read.
        for batch in parquet.iter_batches(columns=[column]):
            if not is_text:
                for _ in range(batch.num_rows):
                    row += 1
                    yield Record(uri, row, None, f"column '{column}' is {kind}, not a string")
                continue
            # As bytes, so invalid UTF-8 is one bad record, not an exception for the batch.
            for value in batch.column(0).cast(pa.large_binary()).to_pylist():
                row += 1
                yield _parquet_record(uri, row, column, value)


def _parquet_record(uri: str, row: int, column: str, value: bytes | None) -> Record:
    if value is None:
        return Record(uri, row, None, f"column '{column}' is null")
    try:
        return Record(uri, row, value.decode("utf-8"))
    except UnicodeDecodeError:
        return Record(uri, row, None, "is not valid UTF-8")


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _text_records(uri: str) -> Iterator[Record]:
    paragraph: list[str] = []
    start = 1
    for number, raw in _lines(uri):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield Record(uri, number, None, "is not valid UTF-8")
            continue
        if line.strip():
            if not paragraph:
                start = number
            paragraph.append(line)
        elif paragraph:
            yield Record(uri, start, "\n".join(paragraph))
            paragraph = []
    if paragraph:
        yield Record(uri, start, "\n".join(paragraph))


def describe(record: Record) -> str:
    return f"{record.uri} line {record.line} {record.problem}"
