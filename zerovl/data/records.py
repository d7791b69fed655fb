"""Records from one data file — a JSON array, JSON lines, one JSON document, CSV or TSV — read the same way
for every format, so each reader only turns a record into a Sample.

Files come from many editors and tools: a UTF-8 byte-order mark and CRLF (or CR) line endings are
accepted as they are. Bytes that are not UTF-8 never become a traceback: the record holding them is a
:class:`RecordError` that names the file, line and column (raised, or skipped and counted under
``data.skip_bad_samples``); elsewhere — a CSV header, a whole-document file — a :class:`DataError`
saying the same. An empty file is one line naming the file and the config key it came from. Every record
keeps the line it starts on, so any later error points at it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from zerovl.data.samples import RecordError
from zerovl.errors import DataError

BOM = b"\xef\xbb\xbf"
TABLE_EXTENSIONS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
JSON_EXTENSIONS = (".json", ".jsonl", ".ndjson")
HEAD_BYTES = 1 << 20  # what detection reads first; more only when no record fits in it
# bytes that are not UTF-8 survive decoding as lone surrogates (errors="surrogateescape"), one per byte
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def split_source(path: str) -> tuple[str, list[str]]:
    """``data/dataset_info.json#a,b`` -> (``data/dataset_info.json``, [a, b]). A path that exists as written
    keeps any ``#`` it has; names are LLaMA-Factory dataset names and contain no ``#``."""
    if "#" not in path or os.path.exists(path):
        return path, []
    file, names = path.rsplit("#", 1)
    return file, [n.strip() for n in names.split(",") if n.strip()]


def _from(key: str | None) -> str:
    return f" (from {key})" if key else ""


def empty_file_error(path: str, key: str | None) -> DataError:
    where = key or "the config"
    return DataError(f"{path}: the file is empty{_from(key)}; put records in it or point {where} at another file")


def decode(data: bytes) -> str:
    """Text of a file's bytes: BOM dropped, line endings made ``\\n``, non-UTF-8 bytes kept as surrogates
    (found again by :func:`utf8_problem`) instead of failing the whole file."""
    if data.startswith(BOM):
        data = data[len(BOM):]
    text = data.decode("utf-8", errors="surrogateescape")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def read_text(path: str, key: str | None = None) -> str:
    with open(path, "rb") as f:
        text = decode(f.read())
    if not text.strip():
        raise empty_file_error(path, key)
    return text


def utf8_problem(path: str, text: str, start: int = 0, end: int | None = None, line: int | None = None,
                 line_start: int = 0) -> str | None:
    """One line naming the first non-UTF-8 byte in ``text[start:end]`` (file, line, byte, column), or None.
    ``line`` is the line number at offset ``line_start`` when the caller knows it (saves counting)."""
    bad = _NOT_UTF8.search(text, start, len(text) if end is None else end)
    if bad is None:
        return None
    pos = bad.start()
    line = text.count("\n", 0, pos) + 1 if line is None else line + text.count("\n", line_start, pos)
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    byte = ord(bad.group()) - 0xDC00
    return f"{path}: line {line} is not UTF-8 (byte 0x{byte:02x} at column {column}); re-save the file as UTF-8"


def has_bad_bytes(value: Any) -> bool:
    """True when a parsed string (or a list/dict of them) still holds a non-UTF-8 byte."""
    if isinstance(value, str):
        return _NOT_UTF8.search(value) is not None
    if isinstance(value, list):
        return any(has_bad_bytes(v) for v in value)
    if isinstance(value, dict):
        return any(has_bad_bytes(k) or has_bad_bytes(v) for k, v in value.items())
    return False


def load_json_document(path: str, key: str | None = None) -> Any:
    """One JSON document (a COCO file, a dataset_info.json), or a one-line DataError naming file and line."""
    text = read_text(path, key)
    problem = utf8_problem(path, text)
    if problem:
        raise DataError(problem)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


# -- containers -----------------------------------------------------------------------------------------
def table_delimiter(path: str, first_line: str = "") -> str | None:
    """``,`` / tab for CSV / TSV files (by extension; else, for a file not named as JSON, by a first line
    that is not JSON), or None."""
    ext = os.path.splitext(path)[1].lower()
    if ext in TABLE_EXTENSIONS:
        return TABLE_EXTENSIONS[ext]
    if first_line and ext not in JSON_EXTENSIONS and first_line.lstrip()[:1] not in ("[", "{"):
        if "\t" in first_line:
            return "\t"
        if "," in first_line:
            return ","
    return None


def _first_line(text: str) -> str:
    stripped = text.lstrip()
    return stripped.split("\n", 1)[0]


def _is_json_lines(text: str) -> bool:
    """A ``{`` file is JSON lines when its first line is a whole JSON value by itself."""
    try:
        json.loads(_first_line(text))
    except json.JSONDecodeError:
        return False
    return True


def iter_records(path: str, key: str | None = None) -> Iterator[tuple[int, Any]]:
    """``(line, record)`` from a JSON array, JSON lines, one JSON document or a CSV/TSV table (rows as
    dicts); a record that cannot be read is yielded as a :class:`RecordError` for the reader's policy."""
    text = read_text(path, key)
    delimiter = table_delimiter(path, _first_line(text))
    if delimiter is not None:
        _, rows = table_rows(path, delimiter, text)
        yield from rows
        return
    start = len(text) - len(text.lstrip())
    if text[start] == "[":
        yield from _array_records(path, text, start)
    elif text[start] == "{" and not _is_json_lines(text):
        problem = utf8_problem(path, text)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            yield e.lineno, RecordError(problem or f"{path}:{e.lineno}: not valid JSON ({e.msg})")
            return
        yield text.count("\n", 0, start) + 1, RecordError(problem, kind="not_utf8") if problem else record
    else:
        yield from _line_records(path, text)


def _line_records(path: str, text: str) -> Iterator[tuple[int, Any]]:
    offset = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        here, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        problem = utf8_problem(path, text, here, here + len(line), lineno, here)
        if problem:
            yield lineno, RecordError(problem, kind="not_utf8")
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, RecordError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})")


def _array_records(path: str, text: str, start: int) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    pos, line, counted = start + 1, text.count("\n", 0, start) + 1, start
    while True:
        while pos < len(text) and text[pos] in " \t\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            problem = utf8_problem(path, text, pos)
            yield line, RecordError(problem or f"{path}:{e.lineno}: not valid JSON ({e.msg}); the rest of the "
                                    "file is unreadable")
            return
        problem = utf8_problem(path, text, pos, end, line, text.rfind("\n", 0, pos) + 1)
        yield line, RecordError(problem, kind="not_utf8") if problem else record
        pos = end


def table_rows(path: str, delimiter: str, text: str | None = None,
               key: str | None = None) -> tuple[list[str], Iterator[tuple[int, Any]]]:
    """The header of a CSV/TSV file and its ``(line, row dict)``; quoted cells may span lines."""
    text = read_text(path, key) if text is None else text
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(rows, [])
    problem = utf8_problem(path, "\n".join(header))
    if problem:
        raise DataError(problem.replace("line 1 is", "the header line is", 1))
    return header, _rows(path, header, rows)


def _rows(path: str, header: list[str], rows) -> Iterator[tuple[int, Any]]:
    line = 1
    for cells in rows:
        first, line = line + 1, rows.line_num  # the row's first line; the header is line 1
        if not any(c.strip() for c in cells):
            continue
        bad = next((i for i, c in enumerate(cells) if _NOT_UTF8.search(c)), None)
        if bad is not None:
            byte = ord(_NOT_UTF8.search(cells[bad]).group()) - 0xDC00
            column = header[bad] if bad < len(header) else f"#{bad + 1}"
            yield first, RecordError(f"{path}: line {first} is not UTF-8 (byte 0x{byte:02x} in column "
                                     f"{column!r}); re-save the file as UTF-8", kind="not_utf8")
            continue
        yield first, dict(zip(header, cells))


# -- the head of a file, for format detection -----------------------------------------------------------
@dataclass
class Head:
    """What the first records of a file look like: its container and up to ``n`` records."""

    container: str  # "json array" | "json lines" | "json document" | "csv" | "tsv" | "text"
    records: list[tuple[int, Any]] = field(default_factory=list)
    header: list[str] | None = None
    first_line: str = ""


def read_head(path: str, n: int = 8, key: str | None = None) -> Head:
    """The container and first ``n`` records, reading only the file's start where that is enough (a
    multi-gigabyte JSON array is not parsed whole to learn its format)."""
    size = os.path.getsize(path)
    limit = HEAD_BYTES
    while True:
        with open(path, "rb") as f:
            data = f.read(limit)
        complete = len(data) >= size
        text = decode(data)
        if not text.strip():
            if complete:
                raise empty_file_error(path, key)
            limit *= 8
            continue
        head = _head_of(path, text, n, complete)
        if head is not None:
            return head
        limit *= 8


def _head_of(path: str, text: str, n: int, complete: bool) -> Head | None:
    first = _first_line(text)
    delimiter = table_delimiter(path, first)
    if delimiter is not None:
        if not complete:  # a cut last row must not be read as a record
            text = text[: text.rfind("\n") + 1]
        header, rows = table_rows(path, delimiter, text)
        records = [r for _, r in zip(range(n), rows)]
        return Head("tsv" if delimiter == "\t" else "csv", records, header, first)
    start = len(text) - len(text.lstrip())
    if text[start] == "[":
        records = [r for _, r in zip(range(n), _array_records(path, text, start))]
        if not complete and (not records or isinstance(records[-1][1], RecordError)):
            # the last record may be cut by the read limit; keep the whole ones, or read more
            records = [r for r in records if not isinstance(r[1], RecordError)]
            if not records:
                return None
        return Head("json array", records, None, first)
    if text[start] == "{":
        if _is_json_lines(text):
            lines = text.split("\n") if complete else text.split("\n")[:-1]
            records = [r for _, r in zip(range(n), _line_records(path, "\n".join(lines)))]
            return Head("json lines", records, None, first)
        if not complete:
            return None
        return Head("json document", list(iter_records(path)), None, first)
    return Head("text", [], None, first)
