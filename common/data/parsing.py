"""Reading text files and parsing their fields, as every reader of fedrec does it: the codec
(UTF-8 unless named, never a silent fallback), the line of a byte that does not decode, lines and
CSV records counted as editors count them, and numbers, ratings and years checked by column.

Shared by the interaction readers (:mod:`common.data.readers`, :mod:`common.data.formats`), the
items file (:mod:`common.data.items_file`) and the device's ratings file (``client/store.py``).
Every error is a :class:`~common.data.errors.DataError` naming file, line and what was expected.
"""

from __future__ import annotations

import codecs
import csv
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from common.data.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_ENCODING = "utf-8"
#: The largest rating kept: ratings are float32 arrays, and a larger value would become inf.
RATING_MAX = float(np.finfo(np.float32).max)
_YEAR = re.compile(r"^(\d{4})$")


def parse_year(value: str) -> str:
    """A four-digit year or "" (ML-100K has 'unkonwn' for item 267)."""
    value = value.strip()
    match = _YEAR.match(value) or re.search(r"(\d{4})", value)
    return match.group(1) if match else ""


def text_encoding(encoding: str | None, path: Path | None = None) -> str:
    """The codec to read text with: UTF-8 unless ``encoding`` names another, which is logged as a
    warning (a wrong guess turns text into mojibake, so it is never made silently)."""
    if encoding is None:
        return DEFAULT_ENCODING
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None
    if name not in ("utf-8", "utf-8-sig"):
        log.warning("%s: reading as %s, not UTF-8, as asked", path if path is not None else "data", name)
    return name


def decode_error(path: Path, encoding: str) -> DataError:
    """The DataError for a file that does not decode as ``encoding``: it names the first line with
    a byte that does not decode (lines counted as the csv module counts them: ``\\n``, ``\\r\\n``
    or a lone ``\\r`` ends one) and says how to read the file instead."""
    name = codecs.lookup(encoding).name
    hint = ("convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or name its encoding explicitly "
            "(e.g. --encoding latin-1)" if name.startswith("utf-8") else "name the file's real encoding")
    decoder = codecs.getincrementaldecoder("utf-8" if name == "utf-8-sig" else name)()
    line = 1
    with path.open("rb") as fh:
        for raw in fh:  # split at b"\n", which is never inside a UTF-8 or single-byte character
            try:
                decoder.decode(raw)
            except UnicodeDecodeError as exc:
                line += _lone_crs(raw[:exc.start])
                return DataError(path, f"expected {name} text, found byte 0x{raw[exc.start:exc.start + 1].hex()} "
                                       f"that is not {name}; {hint}", line)
            line += 1 + _lone_crs(raw)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return DataError(path, f"expected {name} text, found a truncated character at the end; {hint}",
                             max(line - 1, 1))
    return DataError(path, f"expected {name} text, found bytes that are not; {hint}")


def _lone_crs(raw: bytes) -> int:
    return raw.replace(b"\r\n", b"").count(b"\r")


def split_lines(text: str) -> list[str]:
    """Lines as the csv module and editors count them (``\\n``, ``\\r\\n``, lone ``\\r``), not
    ``str.splitlines`` (which also breaks at form feeds, ``\\x1c``-``\\x1e``, ``\\x85``, U+2028...)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def read_lines(path: Path, encoding: str | None = None, expected: str = "rows") -> list[str]:
    """The lines of a text file (see :func:`split_lines`); an empty file is a DataError."""
    if not path.is_file():
        raise DataError(path, "file not found")
    name = text_encoding(encoding, path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig" if name == "utf-8" else name)
    except UnicodeDecodeError:
        raise decode_error(path, name) from None
    lines = split_lines(text)
    if not any(line.strip() for line in lines):
        raise DataError(path, f"expected {expected}, found an empty file", 1)
    return lines


def parse_number(path: Path, lineno: int, column: str, value: str) -> float:
    """``value`` as a finite float, or a DataError naming file, line and column."""
    try:
        out = float(value)
    except ValueError:
        raise DataError(path, f"column '{column}': expected a number, found {value!r}", lineno) from None
    if not np.isfinite(out):
        raise DataError(path, f"column '{column}': expected a finite number, found {value!r}", lineno)
    return out


def parse_rating(path: Path, lineno: int, column: str, value: str) -> float:
    """:func:`parse_number` that also fits a float32 rating (|r| ≤ 3.4e38): 1e308 would become inf."""
    out = parse_number(path, lineno, column, value)
    if abs(out) > RATING_MAX:
        raise DataError(path, f"column '{column}': expected a rating within ±{RATING_MAX:.3g} (stored as a 32-bit "
                              f"float), found {value!r}", lineno)
    return out


def csv_rows(path: Path, reader: Any) -> Iterator[tuple[int, list[str]]]:
    """(first line of the record, fields) for each non-empty CSV record; a malformed record is a
    DataError naming the file and line (shared by the data readers and the device store)."""
    line = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(path, f"expected well-formed CSV, found: {exc}", line + 1) from None
        start, line = line + 1, reader.line_num
        if fields:
            yield start, fields


def csv_records(path: Path, encoding: str | None = None) -> Iterator[tuple[int, list[str]]]:
    """(line, stripped fields) of each non-blank CSV record (``.tsv``: tab-separated), BOM stripped.
    UTF-8 unless ``encoding`` names another; a byte that does not decode is a DataError naming its line."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    if not path.is_file():
        raise DataError(path, "file not found")
    name = text_encoding(encoding, path)
    with path.open(encoding="utf-8-sig" if name == "utf-8" else name, newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, strict=True)
        try:
            for line, fields in csv_rows(path, reader):
                if any(f.strip() for f in fields):
                    yield line, [f.strip() for f in fields]
        except UnicodeDecodeError:  # raised a read-ahead buffer early: find the real line
            raise decode_error(path, name) from None


def csv_header(path: Path, records: Iterator[tuple[int, list[str]]], expected: str) -> tuple[int, list[str]]:
    """(line, lower-cased column names) of the header, the first record of ``records``; an empty
    file or a column named twice is a DataError (``expected`` says what the header should be)."""
    first = next(records, None)
    if first is None:
        raise DataError(path, f"expected a header line {expected}, found an empty file", 1)
    line, header = first
    names = [h.lower() for h in header]
    for k, name in enumerate(names):
        if name in names[:k]:
            raise DataError(path, f"column '{name}' appears twice in the header", line)
    return line, names


def csv_fields(path: Path, line: int, fields: list[str], header: list[str], sep: str) -> dict[str, str]:
    """One record as column -> value; the header again or a wrong field count is a DataError."""
    if fields and [f.lower() for f in fields] == header:
        raise DataError(path, f"expected a data row, found the header {sep.join(header)!r} again", line)
    if len(fields) != len(header):
        raise DataError(path, f"expected {len(header)} fields ({sep.join(header)}), found {len(fields)}", line)
    return dict(zip(header, fields))
