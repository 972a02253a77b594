"""One user's ratings file as the device reads it (``fedrec-client import``).

``item,rating[,timestamp]`` or ``user,item,rating,timestamp`` (one user: this device's), CSV or
TSV; every mistake is a :class:`~common.data.errors.DataError` naming file, line and what was
expected.
"""

from __future__ import annotations

from pathlib import Path

from common.data.errors import DataError
from common.data.parsing import csv_fields, csv_header, csv_records, parse_number, parse_rating


def read_ratings_file(path: str | Path,
                      encoding: str | None = None) -> tuple[list[tuple[int, str, float, float | None]], str | None]:
    """Validated rows ``(line, item, rating, timestamp)`` of one user's ratings file, and the
    user id when the file names one. Raises :class:`DataError` naming file and line; a rating
    must be finite and fit a float32, a timestamp must be finite."""
    path = Path(path)
    expected = "item,rating[,timestamp] or user,item,rating,timestamp"
    records = csv_records(path, encoding)
    header_line, header = csv_header(path, records, expected)
    for name in header:
        if name not in ("user", "item", "rating", "timestamp"):
            raise DataError(path, f"unexpected column '{name}': expected the header {expected}", header_line)
    for name in ("item", "rating"):
        if name not in header:
            raise DataError(path, f"missing column '{name}': expected the header {expected}, found "
                                  f"{','.join(header)}", header_line)
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    out: list[tuple[int, str, float, float | None]] = []
    user: tuple[str, int] | None = None
    for line, fields in records:
        row = csv_fields(path, line, fields, header, sep)
        if not row["item"]:
            raise DataError(path, "column 'item': expected a non-empty item id, found ''", line)
        if "user" in row:
            if not row["user"]:
                raise DataError(path, "column 'user': expected a non-empty user id, found ''", line)
            if user is None:
                user = (row["user"], line)
            elif row["user"] != user[0]:
                raise DataError(path, f"expected the ratings of one user (this device's), found user {row['user']!r} "
                                      f"here and {user[0]!r} on line {user[1]}: export only your own ratings "
                                      "(a data set of many users is for the server: fedrec data info)", line)
        stamp = parse_number(path, line, "timestamp", row["timestamp"]) if "timestamp" in row else None
        out.append((line, row["item"], parse_rating(path, line, "rating", row["rating"]), stamp))
    if not out:
        raise DataError(path, "expected rating rows after the header, found none", header_line + 1)
    return out, None if user is None else user[0]
