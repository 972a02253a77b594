"""Readers for the interaction formats users actually have.

Every reader returns :class:`common.data.dataset.Interactions` and raises
:class:`common.data.errors.DataError` naming file, line and what was expected.

Formats
-------
``ml-100k``   the embedded default (RecBole atomic files from the recbole 1.2.1 wheel)
``atomic``    a directory with RecBole atomic files ``NAME.inter`` [+ ``NAME.item``]
``grouplens-100k``  ``u.data`` + ``u.item`` (GroupLens ML-100K)
``ml-1m``     ``ratings.dat`` + ``movies.dat``
``ml-latest`` ``ratings.csv`` + ``movies.csv`` (ML-latest, ML-20M, ML-25M)
``generic``   a CSV or Parquet file ``user,item[,rating][,timestamp][,text]`` plus an optional
              item file ``item,title[,text]``

Text files are read as UTF-8 (a BOM is allowed) unless the caller names another ``encoding``
(``load_interactions(..., encoding="latin-1")``): there is no silent fallback, a byte that does
not decode is a DataError naming its line, and reading as anything but UTF-8 is logged as a
warning. The GroupLens item files ``u.item`` and ``movies.dat`` are Latin-1 by their format's
definition and are read so unless an encoding is named.
"""

from __future__ import annotations

from common.choices import DataFormat, values

import codecs
import logging
import re
from pathlib import Path

import numpy as np

from common.data.dataset import Interactions, ItemInfo, build_interactions
from common.data.errors import DataError

log = logging.getLogger(__name__)

FORMATS = values(DataFormat)
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


def _read_lines(path: Path, encoding: str | None = None, expected: str = "rows") -> list[str]:
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


def read_atomic(directory: Path, name: str | None = None, encoding: str | None = None) -> Interactions:
    """RecBole atomic files: tab-separated with a typed header (``user_id:token ...``)."""
    directory = Path(directory)
    if name is None:
        inters = sorted(directory.glob("*.inter"))
        if not inters:
            raise DataError(directory, "no *.inter file found (RecBole atomic format expected)")
        name = inters[0].stem
    inter = directory / f"{name}.inter"
    lines = _read_lines(inter, encoding, "a header line user_id:token, item_id:token ... and interaction rows")
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    for col in ("user_id", "item_id"):
        if col not in header:
            raise DataError(inter, f"header must name '{col}:token', got {lines[0]!r}", 1)
    iu, ii = header.index("user_id"), header.index("item_id")
    ir = header.index("rating") if "rating" in header else None
    it = header.index("timestamp") if "timestamp" in header else None
    users, items, ratings, stamps = [], [], [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(inter, f"expected {len(header)} tab-separated fields, got {len(fields)}", lineno)
        for col, k in (("user_id", iu), ("item_id", ii)):
            if not fields[k].strip():
                raise DataError(inter, f"column '{col}': expected a non-empty id, found {fields[k]!r}", lineno)
        users.append(fields[iu])
        items.append(fields[ii])
        if ir is not None:
            ratings.append(parse_rating(inter, lineno, "rating", fields[ir]))
        if it is not None:
            stamps.append(parse_number(inter, lineno, "timestamp", fields[it]))
    if not users:
        raise DataError(inter, "expected interaction rows after the header, found none", len(lines) + 1)
    info: dict[str, ItemInfo] = {}
    item_file = directory / f"{name}.item"
    if item_file.is_file():
        item_lines = _read_lines(item_file, encoding, "a header line item_id:token ... and item rows")
        ih = [h.split(":")[0] for h in item_lines[0].split("\t")]
        if "item_id" not in ih:
            raise DataError(item_file, f"header must name 'item_id:token', got {item_lines[0]!r}", 1)
        first: dict[str, int] = {}
        for lineno, line in enumerate(item_lines[1:], start=2):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != len(ih):
                raise DataError(item_file, f"expected {len(ih)} tab-separated fields ({', '.join(ih)}), "
                                           f"got {len(fields)}", lineno)
            f = dict(zip(ih, fields))
            item = f["item_id"]
            if not item.strip():
                raise DataError(item_file, f"column 'item_id': expected a non-empty id, found {item!r}", lineno)
            if item in first:
                raise DataError(item_file, f"expected each item id once, found {item!r} again "
                                           f"(first on line {first[item]})", lineno)
            first[item] = lineno
            title = f.get("movie_title", f.get("title", "")).strip()
            info[item] = ItemInfo(
                title=title or item,
                year=parse_year(f.get("release_year", "")),
                genres=tuple(f.get("class", f.get("genres", "")).split()),
                description=f.get("description", "").strip(),
            )
    return build_interactions(
        name=name,
        raw_user=users,
        raw_item=items,
        rating=np.asarray(ratings) if ir is not None else None,
        timestamp=np.asarray(stamps) if it is not None else None,
        item_info=info,
    )


def detect_format(path: Path) -> str:
    """Guess the format of ``path`` from the files it holds."""
    if path.is_dir():
        if (path / "u.data").is_file():
            return "grouplens-100k"
        if (path / "ratings.dat").is_file():
            return "ml-1m"
        if (path / "ratings.csv").is_file():
            return "ml-latest"
        if any(path.glob("*.inter")):
            return "atomic"
        raise DataError(path, "unknown format: expected u.data (ML-100K), ratings.dat (ML-1M), "
                              "ratings.csv (ML-latest/20M/25M) or a RecBole *.inter file in this directory")
    if path.suffix.lower() in (".csv", ".parquet", ".tsv"):
        return "generic"
    if path.suffix.lower() == ".inter":
        return "atomic"
    raise DataError(path, "unknown format: expected a directory of MovieLens files or a .csv/.parquet file")


def load_interactions(source: str = "ml-100k", fmt: str = "auto", item_file: str | None = None,
                      encoding: str | None = None) -> Interactions:
    """Load ``source`` ("ml-100k" for the embedded default, "synthetic:N" for N users resampled
    from it, or a path) in format ``fmt``. Text files are UTF-8 unless ``encoding`` names another
    codec (e.g. "latin-1"), which is then logged as a warning; see the module docstring."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if source == "ml-100k" and fmt in ("auto", "ml-100k"):
        from common.data.embedded import fetch_ml100k

        data = read_atomic(fetch_ml100k(), "ml-100k")
        return data
    if source.startswith("synthetic:"):
        # N users resampled from ML-100K (scale tests): see common.data.synthetic.
        from common.data.synthetic import parse_synthetic_source, synthetic_like

        n = parse_synthetic_source(source)
        if fmt != "auto":
            raise ValueError(f"data source {source!r} is generated, not read: data.format must be 'auto', got {fmt!r}")
        return synthetic_like(load_interactions("ml-100k"), n, seed=0)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(path, "no such file or directory")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "atomic":
        return read_atomic(path.parent if path.is_file() else path, path.stem if path.is_file() else None, encoding)
    from common.data import formats  # the other readers

    if fmt == "grouplens-100k":
        return formats.read_grouplens_100k(path, encoding)
    if fmt == "ml-1m":
        return formats.read_ml_1m(path, encoding)
    if fmt == "ml-latest":
        return formats.read_ml_latest(path, encoding)
    return formats.read_generic(path, Path(item_file) if item_file else None, encoding)
