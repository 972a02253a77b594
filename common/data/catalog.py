"""The item catalogue of a data config: what the items file publishes and the model's rows are."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.data.readers import load_interactions
from common.data.synthetic import is_synthetic_source, synthetic_source

if TYPE_CHECKING:
    from common.config import DataConfig


def load_catalog(data: DataConfig) -> tuple[tuple[str, ...], list[str]]:
    """The item catalogue of ``data`` (public: ids and titles, in model-row order), not who rated
    what. A title carries its year when the data set has one: ``Toy Story (1995)``. A synthetic
    source's catalogue comes without generating its users."""
    if is_synthetic_source(data.source):
        users = synthetic_source(data.source, data.format)
        item_ids, items = users.item_ids, users.items
    else:
        interactions = load_interactions(data.source, data.format, data.item_file or None)
        item_ids, items = interactions.item_ids, interactions.items
    titles = [info.title + (f" ({info.year})" if info.year else "") for info in items]
    return item_ids, titles
