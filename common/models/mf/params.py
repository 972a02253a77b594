"""The MF model's parameters: item embeddings and biases (:class:`ItemParams`)."""

from __future__ import annotations

import numpy as np

from common.models.contract import ItemParams


def init_items(n_items: int, dim: int, *, seed: int, scale: float = 0.1, bias: float = 0.0) -> ItemParams:
    rng = np.random.default_rng(seed)
    return ItemParams(
        (rng.standard_normal((n_items, dim)) * scale).astype(np.float32),
        np.full(n_items, bias, dtype=np.float32),
    )
