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

from pathlib import Path

import numpy as np

from common.choices import DataFormat, values
from common.data import formats
from common.data.dataset import Interactions, ItemInfo, build_interactions
from common.data.errors import DataError
from common.data.parsing import parse_number, parse_rating, parse_year, read_lines

FORMATS = values(DataFormat)


def read_atomic(directory: Path, name: str | None = None, encoding: str | None = None) -> Interactions:
    """RecBole atomic files: tab-separated with a typed header (``user_id:token ...``)."""
    directory = Path(directory)
    if name is None:
        inters = sorted(directory.glob("*.inter"))
        if not inters:
            raise DataError(directory, "no *.inter file found (RecBole atomic format expected)")
        name = inters[0].stem
    inter = directory / f"{name}.inter"
    lines = read_lines(inter, encoding, "a header line user_id:token, item_id:token ... and interaction rows")
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
        item_lines = read_lines(item_file, encoding, "a header line item_id:token ... and item rows")
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
    """Load ``source`` ("ml-100k" for the embedded default, "synthetic:N" or "synthetic:N:ITEMS"
    for N users resampled from it, or a path) in format ``fmt``. Text files are UTF-8 unless ``encoding`` names another
    codec (e.g. "latin-1"), which is then logged as a warning; see the module docstring."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if source == "ml-100k" and fmt in ("auto", "ml-100k"):
        from common.data.embedded import fetch_ml100k

        data = read_atomic(fetch_ml100k(), "ml-100k")
        return data
    if source.startswith("synthetic:"):
        # N users resampled from ML-100K (scale tests), over ITEMS items: see common.data.synthetic.
        from common.data.synthetic import synthetic_source

        return synthetic_source(source, fmt).interactions()
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(path, "no such file or directory")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "atomic":
        return read_atomic(path.parent if path.is_file() else path, path.stem if path.is_file() else None, encoding)
    if fmt == "grouplens-100k":
        return formats.read_grouplens_100k(path, encoding)
    if fmt == "ml-1m":
        return formats.read_ml_1m(path, encoding)
    if fmt == "ml-latest":
        return formats.read_ml_latest(path, encoding)
    return formats.read_generic(path, Path(item_file) if item_file else None, encoding)
