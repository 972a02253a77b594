"""The public text of every item of a configured data set (what a text tower reads)."""

from __future__ import annotations

import functools

from common.config import DataConfig


@functools.lru_cache(maxsize=2)
def item_texts(data: DataConfig) -> tuple[str, ...]:
    """The public text of every item (``ItemInfo.text``), in model-row order (a synthetic
    source's without generating its users)."""
    from common.data import load_interactions
    from common.data.synthetic import is_synthetic_source, synthetic_source

    if is_synthetic_source(data.source):
        return tuple(info.text for info in synthetic_source(data.source, data.format).items)
    interactions = load_interactions(data.source, data.format, data.item_file or None)
    return tuple(info.text for info in interactions.items)
