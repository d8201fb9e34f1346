"""Reading corpus files into documents: JSONL (a named field) or plain text (blank-line separated).

Records that are not valid UTF-8 or JSON are reported with their file and line, so that a
caller can either stop with a one-line error or count and skip them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from sae import storage
from sae.errors import InputError


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
    """Documents of one corpus file, streamed line by line."""
    if fmt == "jsonl":
        yield from _jsonl_records(uri, text_field)
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
