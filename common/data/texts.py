"""The public text of every item of a configured data set (what a text tower reads)."""

from __future__ import annotations

import functools

from common.config import DataConfig


@functools.lru_cache(maxsize=2)
def item_texts(data: DataConfig) -> tuple[str, ...]:
    """The public text of every item (``ItemInfo.text``), in model-row order."""
    from common.data import load_interactions

    interactions = load_interactions(data.source, data.format, data.item_file or None)
    return tuple(info.text for info in interactions.items)
