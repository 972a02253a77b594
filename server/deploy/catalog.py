"""The item list devices import before they join."""

from __future__ import annotations

from pathlib import Path


def write_catalog(out: str | Path, *, source: str = "ml-100k", fmt: str = "auto", item_file: str = "") -> Path:
    """``items.csv`` (item_id,title,text; one row per model row) for ``source``: exactly the file
    every run directory publishes, available before the first run so devices can import it
    (``fedrec-client import --items items.csv``) and join."""
    from common.config import RunConfig
    from common.data.catalog import load_catalog
    from common.data.items_file import write_items_file
    from common.data.texts import item_texts

    cfg = RunConfig.from_flat({"data.source": source, "data.format": fmt, "data.item-file": item_file})
    ids, titles = load_catalog(cfg.data)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_items_file(out, ids, titles, item_texts(cfg.data))
    return out
