"""Synthetic users resampled from a real data set, for scale tests (10k+ simulated clients).

Each synthetic user copies the interactions (items, ratings, timestamps) of a real user drawn
uniformly with replacement, then swaps a fraction of those items for items drawn from the
item popularity distribution of the base data (without repeating an item within a user).
Profile sizes, ratings and item popularity therefore follow the base data; the item
catalogue (ids and :class:`ItemInfo`) is the base data's own.

``load_interactions("synthetic:N")`` gives ``synthetic_like(ML-100K, N, seed=0)``.
"""

from __future__ import annotations

import numpy as np

from common.data.dataset import Interactions
from common.streams import Stream, generator

SYNTHETIC_PREFIX = "synthetic:"
SWAP_FRACTION = 0.2


def parse_synthetic_source(source: str) -> int:
    """The number of users N of a ``synthetic:N`` source; ``ValueError`` naming the problem."""
    if not source.startswith(SYNTHETIC_PREFIX):
        raise ValueError(f"not a synthetic source: {source!r} (expected 'synthetic:N')")
    text = source[len(SYNTHETIC_PREFIX):].strip()
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"data source {source!r}: expected 'synthetic:N' with N a positive integer "
                         f"number of users, e.g. 'synthetic:10000'") from None
    if n < 1:
        raise ValueError(f"data source {source!r}: the number of synthetic users must be ≥ 1, got {n}")
    return n


def synthetic_like(base: Interactions, n_users: int, *, seed: int,
                   swap_fraction: float = SWAP_FRACTION) -> Interactions:
    """``n_users`` synthetic users resampled from ``base`` (see module docstring).

    Deterministic for ``(base, n_users, seed, swap_fraction)``. Every synthetic user has exactly
    as many interactions as the real user it copies; each of them is swapped with probability
    ``swap_fraction`` for a popularity-drawn item the user does not already hold (the swapped
    row keeps its rating and timestamp).
    """
    if n_users < 1:
        raise ValueError(f"n_users must be ≥ 1, got {n_users}")
    if not 0.0 <= swap_fraction <= 1.0:
        raise ValueError(f"swap_fraction must be in [0, 1], got {swap_fraction}")
    if len(base) == 0:
        raise ValueError("cannot resample users from an empty data set")
    rng = generator(Stream.SYNTHETIC, seed)

    # Base rows grouped by user.
    order = np.lexsort((base.item, base.user))
    counts = np.bincount(base.user, minlength=base.n_users)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    real_users = np.flatnonzero(counts > 0)

    popularity = np.bincount(base.item, minlength=base.n_items).astype(np.float64)
    log_p = np.full(base.n_items, -np.inf)
    log_p[popularity > 0] = np.log(popularity[popularity > 0] / popularity.sum())

    picked = rng.choice(real_users, size=n_users, replace=True)
    users, items, ratings, stamps = [], [], [], []
    for new_u, real in enumerate(picked):
        rows = order[starts[real]:starts[real] + counts[real]]
        own = base.item[rows].copy()
        swap = rng.random(len(own)) < swap_fraction
        k = int(swap.sum())
        if k:
            # Weighted sampling without replacement (Gumbel top-k) among items the user keeps not.
            keys = log_p + rng.gumbel(size=base.n_items)
            keys[own[~swap]] = -np.inf
            top = np.argpartition(-keys, k - 1)[:k]
            top = top[np.isfinite(keys[top])]  # fewer candidates than k: keep the originals
            slots = np.flatnonzero(swap)[:len(top)]
            own[slots] = top
        users.append(np.full(len(own), new_u, dtype=np.int64))
        items.append(own.astype(np.int64))
        ratings.append(base.rating[rows])
        stamps.append(base.timestamp[rows])

    width = len(str(n_users - 1))
    return Interactions(
        name=f"{base.name}-synthetic{n_users}",
        user=np.concatenate(users),
        item=np.concatenate(items),
        rating=np.concatenate(ratings).astype(np.float32),
        timestamp=np.concatenate(stamps).astype(np.float64),
        user_ids=tuple(f"s{u:0{width}d}" for u in range(n_users)),
        item_ids=base.item_ids,
        items=base.items,
        explicit=base.explicit,
        report=(*base.report, f"{n_users} synthetic users resampled from {base.name} (seed {seed}, "
                              f"{swap_fraction:.0%} of items swapped by popularity)"),
    )
