"""The items file: the item list a model indexes, ``item_id,title[,text]`` with one row per model
row, in order; ``text`` (optional) is each item's public text, what a text tower reads (a device
running the hybrid model embeds it). A server publishes it beside every ``model.safetensors`` (``server/run_dir.py``) and
before the first run (``fedrec deploy items``); a device imports it (``fedrec-client import
--items``) to turn its own item ids into the model's rows."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from common.data.errors import DataError
from common.data.parsing import csv_fields, csv_header, csv_records


def read_items_file(path: str | Path, encoding: str | None = None) -> tuple[list[str], list[str]]:
    """The item ids and titles of an items file, in row order (= the model's row order).

    Format: CSV with a header naming ``item_id`` (or ``item``) and ``title``; other columns are
    ignored. The server publishes one beside its ``model.safetensors``."""
    ids, titles, _ = _read(path, encoding, with_texts=False)
    return ids, titles


def read_item_texts(path: str | Path, encoding: str | None = None) -> list[str] | None:
    """The ``text`` column of an items file in row order, or None when it has none (an older
    server's file). A row with an empty text is an error: a text tower would embed nothing."""
    return read_items_with_texts(path, encoding)[2]


def read_items_with_texts(path: str | Path, encoding: str | None = None
                          ) -> tuple[list[str], list[str], list[str] | None]:
    """(item ids, titles, texts or None) of an items file, read once: :func:`read_items_file`
    and :func:`read_item_texts` together."""
    return _read(path, encoding, with_texts=True)


def _read(path: str | Path, encoding: str | None, *, with_texts: bool
          ) -> tuple[list[str], list[str], list[str] | None]:
    path = Path(path)
    records = csv_records(path, encoding)
    header_line, header = csv_header(path, records, "item_id,title")
    id_col = "item_id" if "item_id" in header else "item" if "item" in header else None
    if id_col is None or "title" not in header:
        raise DataError(path, f"expected the header item_id,title, found {','.join(header)}", header_line)
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] | None = [] if with_texts and "text" in header else None
    first: dict[str, int] = {}
    for line, fields in records:
        row = csv_fields(path, line, fields, header, sep)
        item = row[id_col]
        if not item:
            raise DataError(path, f"column '{id_col}': expected a non-empty item id, found ''", line)
        if item in first:
            raise DataError(path, f"expected each item id once, found {item!r} again (first on line {first[item]})",
                            line)
        first[item] = line
        ids.append(item)
        titles.append(row["title"] or item)
        if texts is not None:
            if not row["text"].strip():
                raise DataError(path, "column 'text': expected the item's text, found an empty value", line)
            texts.append(row["text"])
    if not ids:
        raise DataError(path, "expected item rows after the header, found none", header_line + 1)
    return ids, titles, texts


def write_items_file(path: str | Path, item_ids: Sequence[str], titles: Sequence[str],
                     texts: Sequence[str] | None = None) -> None:
    """Write an items file :func:`read_items_file` reads (what a server publishes with a model);
    with ``texts``, the ``text`` column too."""
    if texts is not None and len(texts) != len(item_ids):
        raise ValueError(f"{len(item_ids)} item ids but {len(texts)} texts")
    with Path(path).open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        if texts is None:
            writer.writerow(["item_id", "title"])
            writer.writerows(zip(item_ids, titles))
        else:
            writer.writerow(["item_id", "title", "text"])
            writer.writerows(zip(item_ids, titles, texts))
