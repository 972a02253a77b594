"""Readers for MovieLens files (GroupLens 100K, 1M, latest/20M/25M) and generic CSV/TSV/Parquet.

Every reader raises :class:`DataError` naming the file, the 1-based line (Parquet: the 1-based
row) and what was expected vs found. With pyarrow installed, plain (unquoted) CSV and Parquet
files are first read column-wise; on any doubt the row-by-row path runs and reports precisely.
Text is UTF-8 unless an ``encoding`` is named (see :mod:`common.data.parsing`); ratings must be
finite and fit a float32.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from common.data.dataset import Interactions, ItemInfo, build_interactions
from common.data.errors import DataError
from common.data.parsing import RATING_MAX, csv_rows, decode_error, parse_year, read_lines, text_encoding

GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
NO_GENRES = "(no genres listed)"
_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")
Columns = dict[str, Any]  # key -> values (list or array); "line" -> 1-based line of each row (row path)


def split_title(title: str) -> tuple[str, str]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", "1995")``; without a trailing year ``(title, "")``."""
    match = _TITLE_YEAR.match(title.strip())
    return (match.group(1), match.group(2)) if match else (title.strip(), "")


# Converters: their ValueError says what was expected and found; _collect adds file, line, column.
def _id(value: str) -> str:
    if not value.strip():
        raise ValueError(f"expected a non-empty id, found {value!r}")
    return value.strip()


def _number(value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise ValueError(f"expected a number, found {value!r}") from None
    if not np.isfinite(out):
        raise ValueError(f"expected a finite number, found {value!r}")
    return out


def _rating(value: str) -> float:
    out = _number(value)
    if abs(out) > RATING_MAX:  # ratings are float32: a larger value would silently become inf
        raise ValueError(f"expected a rating within ±{RATING_MAX:.3g} (stored as a 32-bit float), found {value!r}")
    return out


def _flag(value: str) -> bool:
    if value.strip() not in ("0", "1"):
        raise ValueError(f"expected a genre flag 0 or 1, found {value!r}")
    return value.strip() == "1"


def _text(value: str) -> str:
    return value.strip()


Spec = dict[str, tuple[str, Callable[[str], Any]]]  # key -> (column name, converter)
_GENERIC: Spec = {"user": ("user", _id), "item": ("item", _id), "rating": ("rating", _rating),
                  "timestamp": ("timestamp", _number), "text": ("text", _text)}
_GENERIC_ITEMS: Spec = {"item": ("item", _id), "title": ("title", _text), "text": ("text", _text)}


def _index(header: list[str], spec: Spec) -> dict[str, int]:
    found = [h.strip().lower() for h in header]
    return {key: found.index(name.lower()) for key, (name, _) in spec.items() if name.lower() in found}


def _collect(path: Path, header: list[str], rows: Iterable[tuple[int, list[str]]], spec: Spec,
             required: Iterable[str], sep: str, header_line: int | None = None) -> Columns:
    """Validate and convert ``rows`` of (line, fields); ``header_line`` is None for headerless files."""
    index = _index(header, spec)
    for key in required:
        if key not in index:
            raise DataError(path, f"missing required column '{spec[key][0]}': expected columns "
                                  f"{', '.join(n for n, _ in spec.values())}, found header {', '.join(header)}",
                            header_line)
    lowered = [h.strip().lower() for h in header]
    out: Columns = {key: [] for key in [*index, "line"]}
    for lineno, fields in rows:
        if header_line is not None and [f.strip().lower() for f in fields] == lowered:
            raise DataError(path, f"expected a data row, found the header {sep.join(header)!r} again "
                                  "(duplicate header line)", lineno)
        if len(fields) != len(header):
            raise DataError(path, f"expected {len(header)} fields separated by {sep!r} ({', '.join(header)}), "
                                  f"found {len(fields)}", lineno)
        for key, i in index.items():
            try:
                out[key].append(spec[key][1](fields[i]))
            except ValueError as exc:
                raise DataError(path, f"column '{header[i].strip()}': {exc}", lineno) from None
        out["line"].append(lineno)
    if not out["line"]:
        raise DataError(path, "expected data rows" + (" after the header" if header_line else "") + ", found none",
                        (header_line or 0) + 1)
    return out


def _read_headerless(path: Path, sep: str, header: list[str], spec: Spec, encoding: str | None) -> Columns:
    lines = read_lines(path, encoding, f"rows of {', '.join(header)}")
    rows = ((n, line.split(sep)) for n, line in enumerate(lines, start=1) if line.strip())
    return _collect(path, header, rows, spec, (), sep)


def _read_csv(path: Path, delimiter: str, spec: Spec, required: Iterable[str], fast: bool = True,
              encoding: str | None = None) -> tuple[Columns, list[str]]:
    """The columns of a CSV file with a header line, and that header (BOM stripped)."""
    if not path.is_file():
        raise DataError(path, "file not found")
    name = text_encoding(encoding, path)
    try:
        with path.open(encoding="utf-8-sig" if name == "utf-8" else name, newline="") as fh:
            rows = csv_rows(path, csv.reader(fh, delimiter=delimiter, strict=True))
            header_line, header = next(rows, (1, []))
            if not header:
                raise DataError(path, f"expected a header line ({', '.join(n for n, _ in spec.values())}), "
                                      "found an empty file", 1)
            columns = (_arrow_csv(path, delimiter, header, spec, required, name) if fast and header_line == 1
                       else None)
            return columns or _collect(path, header, rows, spec, required, delimiter, header_line), header
    except UnicodeDecodeError:
        raise decode_error(path, name) from None


def _arrow_csv(path: Path, delimiter: str, header: list[str], spec: Spec,
               required: Iterable[str], encoding: str = "utf-8") -> Columns | None:
    """Unquoted CSV only: pyarrow forgives bad quoting that the csv module reports."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pacsv
    except ImportError:
        return None
    try:
        as_strings = pacsv.ConvertOptions(column_types={h: pa.string() for h in header}, strings_can_be_null=False)
        read = pacsv.ReadOptions(encoding="utf8" if encoding.startswith("utf-8") else encoding)
        table = pacsv.read_csv(path, read_options=read,
                               parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
                               convert_options=as_strings)
        if table.column_names != header or any(pc.any(pc.match_substring(c, '"')).as_py() for c in table.columns):
            return None
        return _arrow_columns(table, spec, required)
    except Exception:  # anything odd: the row path reports it precisely
        return None


def _arrow_columns(table: Any, spec: Spec, required: Iterable[str]) -> Columns | None:
    """Validated columns of a pyarrow table of strings, or None when the row path must look."""
    import pyarrow as pa
    import pyarrow.compute as pc

    index = _index(table.column_names, spec)
    if table.num_rows == 0 or any(key not in index for key in required):
        return None
    out: Columns = {}
    for key, i in index.items():
        col, convert = table.column(i), spec[key][1]
        if convert is _text:
            out[key] = pc.utf8_trim_whitespace(pc.fill_null(col, "")).to_pylist()
            continue
        if col.null_count:
            return None
        if convert in (_number, _rating):
            try:
                col = pc.cast(col, pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # e.g. "abc", "true": the row path says where
                return None
            if not pc.all(pc.is_finite(col)).as_py():
                return None
            if convert is _rating and pc.max(pc.abs(col)).as_py() > RATING_MAX:
                return None
            out[key] = col.to_numpy()
        else:  # ids; a value equal to the column name may be a repeated header line
            col = pc.utf8_trim_whitespace(col).combine_chunks()
            header_again = pc.equal(pc.utf8_lower(col), spec[key][0].lower())
            if pc.any(pc.equal(col, "")).as_py() or pc.any(header_again).as_py():
                return None
            codes = pc.dictionary_encode(col)  # no Python str per row: 25M rows stay cheap
            out[key] = np.asarray(codes.dictionary.to_pylist(), dtype=str)[codes.indices.to_numpy()]
    return out


def _read_parquet(path: Path, spec: Spec, required: Iterable[str],
                  fast: bool = True) -> tuple[Columns, list[str]]:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(path, "reading Parquet needs pyarrow, found it not installed "
                              "(pip install pyarrow, or convert the file to CSV)") from None
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(path, f"expected a Parquet file, found one pyarrow cannot read: {exc}") from None
    header = list(table.column_names)
    for i in _index(header, spec).values():  # as strings, so both paths see the same values
        field, col = table.schema.field(i), table.column(i)
        if pa.types.is_timestamp(field.type):  # -> seconds since the epoch
            per_s = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}[field.type.unit]
            col = pc.divide(col.cast(pa.int64()).cast(pa.float64()), per_s)
        try:
            table = table.set_column(i, field.name, pc.cast(col, pa.string()))
        except Exception:
            raise DataError(path, f"column '{field.name}': expected numbers or strings, "
                                  f"found {field.type}") from None
    try:
        columns = _arrow_columns(table, spec, required) if fast else None
    except Exception:  # anything odd: the row path reports it precisely
        columns = None
    if columns is not None:
        return columns, header
    values = [table.column(i).to_pylist() for i in range(table.num_columns)]
    rows = ((n, ["" if v is None else str(v) for v in row]) for n, row in enumerate(zip(*values), start=1))
    return _collect(path, header, rows, spec, required, "parquet"), header


def _read_table(path: Path, spec: Spec, required: Iterable[str], fast: bool = True,
                encoding: str | None = None) -> tuple[Columns, list[str]]:
    """A CSV (``.tsv``: tab-separated) or Parquet file with a header."""
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path, spec, required, fast)
    return _read_csv(path, "\t" if path.suffix.lower() == ".tsv" else ",", spec, required, fast, encoding)


def _item_info(path: Path, cols: Columns, make: Callable[[int], ItemInfo]) -> dict[str, ItemInfo]:
    """One ItemInfo per item id (``make(k)`` for row k); an id defined twice is an error."""
    info: dict[str, ItemInfo] = {}
    first: dict[str, int] = {}
    for k, item in enumerate(cols["item"]):
        if item in info:
            raise DataError(path, f"expected each item id once, found {item!r} again "
                                  f"(first on line {first[item]})", cols["line"][k])
        first[item], info[item] = cols["line"][k], make(k)
    return info


def _genre_info(items: Columns) -> Callable[[int], ItemInfo]:
    """``make`` for items with ``title`` "Name (Year)" and ``genres`` "A|B"."""
    def make(k: int) -> ItemInfo:
        title, year = split_title(items["title"][k])
        genres = tuple(g.strip() for g in items["genres"][k].split("|") if g.strip() and g.strip() != NO_GENRES)
        return ItemInfo(title=title or items["item"][k], year=year, genres=genres)
    return make


def _array(values: Any) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=np.float64)


def _build(name: str, cols: Columns, info: dict[str, ItemInfo] | None, item_path: Path | None,
           report: list[str] | None = None) -> Interactions:
    """build_interactions, reporting items that have no metadata (they are titled by their id)."""
    data = build_interactions(name, cols["user"], cols["item"], _array(cols.get("rating")),
                              _array(cols.get("timestamp")), info, report)
    if item_path is None:
        return data
    missing = 0 if info is None else sum(1 for iid in data.item_ids if iid not in info)
    note = (f"no {item_path.name}: items are titled by their id" if info is None else
            f"{missing} items have no entry in {item_path.name}: titled by their id" if missing else "")
    return replace(data, report=data.report + (note,)) if note else data


def read_grouplens_100k(path: str | Path, encoding: str | None = None) -> Interactions:
    """GroupLens ML-100K directory: ``u.data`` (tab: user, item, rating, timestamp) + optional ``u.item``
    (Latin-1, as GroupLens publishes it, unless ``encoding`` is named)."""
    path = Path(path)
    spec: Spec = {"user": ("user", _id), "item": ("item", _id), "rating": ("rating", _rating),
                  "timestamp": ("timestamp", _number)}
    cols = _read_headerless(path / "u.data", "\t", list(spec), spec, encoding)
    item_path, info = path / "u.item", None
    if item_path.is_file():
        header = ["movie id", "movie title", "release date", "video release date", "IMDb URL", *GROUPLENS_GENRES]
        item_spec: Spec = {"item": ("movie id", _id), "title": ("movie title", _text),
                           "date": ("release date", _text), **{g: (g, _flag) for g in GROUPLENS_GENRES}}
        items = _read_headerless(item_path, "|", header, item_spec, encoding or "latin-1")

        def make(k: int) -> ItemInfo:
            title, year = split_title(items["title"][k])
            return ItemInfo(title=title or items["item"][k], year=year or parse_year(items["date"][k]),
                            genres=tuple(g for g in GROUPLENS_GENRES if items[g][k]))

        info = _item_info(item_path, items, make)
    return _build(path.name, cols, info, item_path)


def read_ml_1m(path: str | Path, encoding: str | None = None) -> Interactions:
    """ML-1M directory: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) + optional ``movies.dat``
    (Latin-1, as GroupLens publishes it, unless ``encoding`` is named)."""
    path = Path(path)
    spec: Spec = {"user": ("UserID", _id), "item": ("MovieID", _id), "rating": ("Rating", _rating),
                  "timestamp": ("Timestamp", _number)}
    cols = _read_headerless(path / "ratings.dat", "::", [name for name, _ in spec.values()], spec, encoding)
    item_path, info = path / "movies.dat", None
    if item_path.is_file():
        item_spec: Spec = {"item": ("MovieID", _id), "title": ("Title", _text), "genres": ("Genres", _text)}
        items = _read_headerless(item_path, "::", ["MovieID", "Title", "Genres"], item_spec, encoding or "latin-1")
        info = _item_info(item_path, items, _genre_info(items))
    return _build(path.name, cols, info, item_path)


def read_ml_latest(path: str | Path, encoding: str | None = None) -> Interactions:
    """ML-latest/20M/25M directory: ``ratings.csv`` (userId,movieId,rating,timestamp) + optional
    ``movies.csv`` (movieId,title,genres)."""
    path = Path(path)
    spec: Spec = {"user": ("userId", _id), "item": ("movieId", _id), "rating": ("rating", _rating),
                  "timestamp": ("timestamp", _number)}
    cols, _ = _read_csv(path / "ratings.csv", ",", spec, spec, encoding=encoding)
    item_path, info = path / "movies.csv", None
    if item_path.is_file():
        item_spec: Spec = {"item": ("movieId", _id), "title": ("title", _text), "genres": ("genres", _text)}
        items, _ = _read_csv(item_path, ",", item_spec, item_spec, fast=False, encoding=encoding)
        info = _item_info(item_path, items, _genre_info(items))
    return _build(path.name, cols, info, item_path)


def read_generic_with_text(path: str | Path, item_file: str | Path | None = None,
                           encoding: str | None = None) -> tuple[Interactions, list[str] | None]:
    """Read a generic interaction file and its per-interaction texts.

    Parameters
    ----------
    path:
        CSV (``.tsv``: tab-separated) or Parquet with columns ``user,item[,rating][,timestamp][,text]``;
        other columns are ignored and named in ``report``.
    item_file:
        Optional CSV/TSV/Parquet ``item,title[,text]``; "Name (1995)" titles give the year.
    encoding:
        Of the CSV/TSV files: UTF-8 unless named (another is logged as a warning).

    Returns
    -------
    (Interactions, texts)
        ``texts[k]`` is the ``text`` (e.g. a review) of interaction ``k``; None without a text column.
    """
    path = Path(path)
    cols, header = _read_table(path, _GENERIC, ("user", "item"), encoding=encoding)
    ignored = [h for h in header if h.strip().lower() not in _GENERIC]
    report = [f"ignored columns: {', '.join(ignored)}"] if ignored else []
    item_path, info = (Path(item_file) if item_file is not None else None), None
    if item_path is not None:
        items, _ = _read_table(item_path, _GENERIC_ITEMS, ("item", "title"), fast=False, encoding=encoding)

        def make(k: int) -> ItemInfo:
            title, year = split_title(items["title"][k])
            text = items["text"][k] if "text" in items else ""
            return ItemInfo(title=title or items["item"][k], year=year, description=text)

        info = _item_info(item_path, items, make)
    data = _build(path.stem, cols, info, item_path, report)
    if "text" not in cols:
        return data, None
    keep = _kept_rows(cols)
    assert len(keep) == len(data), "row alignment with build_interactions lost"
    return data, [cols["text"][k] for k in keep]


def _kept_rows(cols: Columns) -> np.ndarray:
    """The rows build_interactions keeps: the latest of each (user, item); on ties the last row."""
    n = len(cols["user"])
    _, user = np.unique(np.asarray(cols["user"], dtype=str), return_inverse=True)
    _, item = np.unique(np.asarray(cols["item"], dtype=str), return_inverse=True)
    stamp = _array(cols.get("timestamp"))
    order = np.lexsort((np.arange(n), np.arange(n) if stamp is None else stamp, item, user))
    last = np.ones(n, dtype=bool)
    last[:-1] = (user[order][1:] != user[order][:-1]) | (item[order][1:] != item[order][:-1])
    return np.sort(order[last])


def read_generic(path: str | Path, item_file: str | Path | None = None, encoding: str | None = None) -> Interactions:
    """:func:`read_generic_with_text` without the per-interaction texts."""
    return read_generic_with_text(path, item_file, encoding)[0]
