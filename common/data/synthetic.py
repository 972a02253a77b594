"""Synthetic users resampled from a real data set, for scale tests (10k-100k+ simulated clients).

Each synthetic user copies the interactions (items, ratings, timestamps) of a real user drawn
uniformly with replacement, then swaps a fraction of those items for items drawn from an item
popularity distribution (weighted sampling without replacement, never an item the user keeps).
Profile sizes, ratings and item popularity therefore follow the base data.

User ``u``'s rows are a function of ``(seed, u)`` alone (and of the catalogue): they come from
a generator of its own (``Stream.SYNTHETIC`` keyed by seed and user), so one simulated client
builds its user without generating the others (:meth:`SyntheticUsers.user`), and the whole
data set (:meth:`SyntheticUsers.interactions`, :func:`synthetic_like`) is the concatenation of
the users in order. Synthetic data sets split per user too (``Interactions.keyed_split``,
common/data/splits.py): a user's train/valid/test rows come from that user alone
(:meth:`SyntheticUsers.user_split`), and the whole-data split gives the same rows.

Catalogue: by default the base data's own (ids and :class:`ItemInfo`). With ``n_items`` above
the base's (``synthetic:USERS:ITEMS``, e.g. ``synthetic:138000:27000`` for an ML-20M-shaped
run) item ``j`` is copy ``c = j // B`` of base item ``j % B`` (B base items): same genres and
year, title and id marked ``#c+1`` for ``c ≥ 1`` ("Toy Story #2 (1995)", id "1#2"). Swapped-in
items are drawn over all the items with weight ``popularity(base item) / (c + 1)``: every copy
keeps the base's long tail, each further copy a little less popular. The copied users' own
items are base items (ids < B) and stay; the copies get interactions only through swaps.

Sources: ``load_interactions("synthetic:N")`` gives ``synthetic_like(ML-100K, N, seed=0)``;
``"synthetic:N:ITEMS"`` the same users over an ITEMS-item catalogue (ITEMS ≥ 1682).
"""

from __future__ import annotations

import functools

import numpy as np

from common.data.dataset import Interactions, ItemInfo
from common.data.splits import user_parts
from common.streams import Stream, generator

SYNTHETIC_PREFIX = "synthetic:"
SWAP_FRACTION = 0.2
#: The items of ML-100K, the base of every ``synthetic:`` source (checked when it is loaded).
BASE_ITEMS = 1682
#: Rounds of with-replacement draws (rejecting held items) before the exact fallback.
_REJECTION_ROUNDS = 16
_SHAPE = f"'synthetic:N' or 'synthetic:N:ITEMS' with N ≥ 1 users and ITEMS ≥ {BASE_ITEMS} items"


def is_synthetic_source(source: str) -> bool:
    return source.startswith(SYNTHETIC_PREFIX)


def parse_synthetic_shape(source: str) -> tuple[int, int]:
    """``(users, items)`` of a ``synthetic:N[:ITEMS]`` source (ITEMS defaults to ML-100K's
    1,682); ``ValueError`` naming the problem."""
    if not is_synthetic_source(source):
        raise ValueError(f"not a synthetic source: {source!r} (expected {_SHAPE})")
    fields = source[len(SYNTHETIC_PREFIX):].split(":")
    if len(fields) > 2:
        raise ValueError(f"data source {source!r}: expected {_SHAPE}, e.g. 'synthetic:138000:27000'")
    try:
        numbers = [int(f.strip()) for f in fields]
    except ValueError:
        raise ValueError(f"data source {source!r}: expected {_SHAPE} (whole numbers), e.g. 'synthetic:10000' "
                         f"or 'synthetic:138000:27000'") from None
    n = numbers[0]
    if n < 1:
        raise ValueError(f"data source {source!r}: the number of synthetic users must be ≥ 1, got {n}")
    items = numbers[1] if len(numbers) == 2 else BASE_ITEMS
    if items < BASE_ITEMS:
        raise ValueError(f"data source {source!r}: the number of synthetic items must be ≥ {BASE_ITEMS} "
                         f"(ML-100K's catalogue, which it copies), got {items}")
    return n, items


def parse_synthetic_source(source: str) -> int:
    """The number of users N of a ``synthetic:N[:ITEMS]`` source; ``ValueError`` naming the problem."""
    return parse_synthetic_shape(source)[0]


def expand_catalogue(item_ids: tuple[str, ...], items: tuple[ItemInfo, ...],
                     n_items: int) -> tuple[tuple[str, ...], tuple[ItemInfo, ...]]:
    """The base catalogue followed by numbered copies up to ``n_items`` (see module docstring)."""
    base = len(item_ids)
    if n_items < base:
        raise ValueError(f"n_items must be ≥ the base's {base} items, got {n_items}")
    ids, infos = list(item_ids), list(items)
    for j in range(base, n_items):
        c, b = divmod(j, base)
        ids.append(f"{item_ids[b]}#{c + 1}")
        info = items[b]
        infos.append(ItemInfo(f"{info.title} #{c + 1}", info.year, info.genres, info.description))
    return tuple(ids), tuple(infos)


class SyntheticUsers:
    """``n_users`` synthetic users resampled from ``base`` (see module docstring); user ``u``
    depends on ``(base, seed, u, n_items, swap_fraction)`` only."""

    def __init__(self, base: Interactions, n_users: int, *, seed: int, n_items: int | None = None,
                 swap_fraction: float = SWAP_FRACTION) -> None:
        if n_users < 1:
            raise ValueError(f"n_users must be ≥ 1, got {n_users}")
        if not 0.0 <= swap_fraction <= 1.0:
            raise ValueError(f"swap_fraction must be in [0, 1], got {swap_fraction}")
        if len(base) == 0:
            raise ValueError("cannot resample users from an empty data set")
        self.base, self.n_users, self.seed, self.swap_fraction = base, int(n_users), int(seed), swap_fraction
        self.n_items = base.n_items if n_items is None else int(n_items)
        self.item_ids, self.items = expand_catalogue(base.item_ids, base.items, self.n_items)

        # Base rows grouped by user (each user's rows sorted by item).
        self._order = np.lexsort((base.item, base.user))
        self._counts = np.bincount(base.user, minlength=base.n_users)
        self._starts = np.r_[0, np.cumsum(self._counts)[:-1]]
        self._real_users = np.flatnonzero(self._counts > 0)

        # Swap-in weights: a copy c of base item b weighs popularity(b) / (c + 1).
        j = np.arange(self.n_items)
        weight = np.bincount(base.item, minlength=base.n_items).astype(np.float64)[j % base.n_items]
        weight /= j // base.n_items + 1
        self._cdf = np.cumsum(weight)
        self._last = int(np.flatnonzero(weight > 0)[-1])
        self._log_w = np.full(self.n_items, -np.inf)
        self._log_w[weight > 0] = np.log(weight[weight > 0] / weight.sum())

    def user(self, u: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """User ``u``'s rows: items (int64), ratings (float32), timestamps (float64)."""
        if not 0 <= u < self.n_users:
            raise ValueError(f"synthetic user {u} out of range: there are {self.n_users}")
        rng = generator(Stream.SYNTHETIC, self.seed, u)
        real = self._real_users[rng.integers(len(self._real_users))]
        rows = self._order[self._starts[real]:self._starts[real] + self._counts[real]]
        own = self.base.item[rows].astype(np.int64)
        swap = rng.random(len(own)) < self.swap_fraction
        k = int(swap.sum())
        if k:
            drawn = self._draw(rng, k, own[~swap])
            own[np.flatnonzero(swap)[:len(drawn)]] = drawn  # fewer candidates than k: keep the originals
        return (own, self.base.rating[rows].astype(np.float32, copy=True),
                self.base.timestamp[rows].astype(np.float64, copy=True))

    def _draw(self, rng: np.random.Generator, k: int, kept: np.ndarray) -> np.ndarray:
        """``k`` items by weight without replacement, none of ``kept``: successive draws with
        replacement, each held or repeated item rejected (the same law as Gumbel top-k); the
        rare user who holds most of the weight finishes with Gumbel top-k over the rest."""
        taken = set(kept.tolist())
        out: list[int] = []
        for _ in range(_REJECTION_ROUNDS):
            need = k - len(out)
            picks = np.searchsorted(self._cdf, rng.random(2 * need + 8) * self._cdf[-1], side="right")
            for item in np.minimum(picks, self._last).tolist():
                if item not in taken:
                    taken.add(item)
                    out.append(item)
                    if len(out) == k:
                        return np.asarray(out, dtype=np.int64)
        keys = self._log_w + rng.gumbel(size=self.n_items)
        keys[np.fromiter(taken, dtype=np.int64, count=len(taken))] = -np.inf
        need = k - len(out)
        top = np.argsort(-keys, kind="stable")[:need]
        out.extend(top[np.isfinite(keys[top])].tolist())
        return np.asarray(out, dtype=np.int64)

    def user_split(self, u: int, kind: str, *, seed: int, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """User ``u``'s train items, train ratings, valid items and test items (items sorted,
        ratings aligned): what ``split_interactions(self.interactions(), kind, seed=seed)`` gives
        that user, for the per-user splits ("random", "leave-last-out")."""
        items, ratings, stamps = self.user(u)
        part = user_parts(u, stamps, kind, seed=seed, ratios=ratios)
        train = part == 0
        order = np.argsort(items[train], kind="stable")
        return (items[train][order], ratings[train][order], np.sort(items[part == 1]), np.sort(items[part == 2]))

    def interactions(self) -> Interactions:
        """The whole data set: every user's rows, user by user."""
        rows = [self.user(u) for u in range(self.n_users)]
        counts = np.fromiter((len(r[0]) for r in rows), dtype=np.int64, count=self.n_users)
        base = self.base
        width = len(str(self.n_users - 1))
        shape = f"{self.n_users}" if self.n_items == base.n_items else f"{self.n_users}x{self.n_items}"
        catalogue = "" if self.n_items == base.n_items else f", {self.n_items} items (copies of its {base.n_items})"
        return Interactions(
            name=f"{base.name}-synthetic{shape}",
            user=np.repeat(np.arange(self.n_users, dtype=np.int64), counts),
            item=np.concatenate([r[0] for r in rows]),
            rating=np.concatenate([r[1] for r in rows]),
            timestamp=np.concatenate([r[2] for r in rows]),
            user_ids=tuple(f"s{u:0{width}d}" for u in range(self.n_users)),
            item_ids=self.item_ids,
            items=self.items,
            explicit=base.explicit,
            report=(*base.report, f"{self.n_users} synthetic users resampled from {base.name} (seed {self.seed}, "
                                  f"{self.swap_fraction:.0%} of items swapped by popularity){catalogue}"),
            keyed_split=True,
        )


def synthetic_like(base: Interactions, n_users: int, *, seed: int, swap_fraction: float = SWAP_FRACTION,
                   n_items: int | None = None) -> Interactions:
    """``n_users`` synthetic users resampled from ``base`` (see module docstring).

    Deterministic for ``(base, n_users, seed, swap_fraction, n_items)``. Every synthetic user
    has exactly as many interactions as the real user it copies; each of them is swapped with
    probability ``swap_fraction`` for a popularity-drawn item the user does not keep (the
    swapped row keeps its rating and timestamp). Row for row the concatenation of
    ``SyntheticUsers(...).user(u)`` over the users.
    """
    return SyntheticUsers(base, n_users, seed=seed, n_items=n_items, swap_fraction=swap_fraction).interactions()


@functools.lru_cache(maxsize=1)
def _ml100k() -> Interactions:
    from common.data.readers import load_interactions

    base = load_interactions("ml-100k")
    if base.n_items != BASE_ITEMS:  # parse_synthetic_shape's rule is written for ML-100K's catalogue
        raise RuntimeError(f"ML-100K has {base.n_items} items, synthetic sources expect {BASE_ITEMS}")
    return base


@functools.lru_cache(maxsize=4)
def synthetic_source(source: str, fmt: str = "auto") -> SyntheticUsers:
    """The users of a ``synthetic:N[:ITEMS]`` source (ML-100K, seed 0), none generated yet: what
    one simulated client, the catalogue and the item texts read without the whole data set."""
    n, items = parse_synthetic_shape(source)
    if fmt != "auto":
        raise ValueError(f"data source {source!r} is generated, not read: data.format must be 'auto', got {fmt!r}")
    return SyntheticUsers(_ml100k(), n, seed=0, n_items=items)
