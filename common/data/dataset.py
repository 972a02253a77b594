"""The in-memory interaction data set every split, model and client works on."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ItemInfo:
    """Metadata of one item; ``text`` is what the language model reads."""

    title: str
    year: str = ""
    genres: tuple[str, ...] = ()
    description: str = ""

    @property
    def text(self) -> str:
        parts = [self.title + (f" ({self.year})" if self.year else "")]
        if self.genres:
            parts.append("Genres: " + ", ".join(self.genres) + ".")
        if self.description:
            parts.append(self.description)
        return " ".join(parts)


@dataclass(frozen=True)
class Interactions:
    """User-item interactions with dense 0-based indices.

    ``user``/``item``/``rating``/``timestamp`` are parallel arrays, one entry per interaction.
    ``user_ids``/``item_ids`` map dense indices back to the ids in the source files.
    ``items`` holds one :class:`ItemInfo` per item index. ``report`` lists what the reader
    did on purpose (e.g. dropped duplicate rows) so nothing is silently lost.
    ``keyed_split``: the random split draws each user's permutation from a generator keyed by
    (split seed, user), so one user's split needs that user's rows only (generated data sets,
    common/data/synthetic.py); False (read data): one generator for the whole split.
    """

    name: str
    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    items: tuple[ItemInfo, ...]
    explicit: bool = True
    report: tuple[str, ...] = field(default=())
    keyed_split: bool = False

    def __post_init__(self) -> None:
        n = len(self.user)
        for name in ("item", "rating", "timestamp"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Interactions.{name} has {len(getattr(self, name))} rows, expected {n}")
        if len(self.items) != len(self.item_ids):
            raise ValueError("Interactions.items must have one entry per item id")
        if n and (self.user.min() < 0 or self.user.max() >= len(self.user_ids)):
            raise ValueError("Interactions.user indices out of range")
        if n and (self.item.min() < 0 or self.item.max() >= len(self.item_ids)):
            raise ValueError("Interactions.item indices out of range")

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.user)

    def item_texts(self) -> list[str]:
        return [info.text for info in self.items]

    def subset(self, mask: np.ndarray) -> "Interactions":
        """The same id space with only the rows where ``mask`` is true."""
        return Interactions(
            name=self.name,
            user=self.user[mask],
            item=self.item[mask],
            rating=self.rating[mask],
            timestamp=self.timestamp[mask],
            user_ids=self.user_ids,
            item_ids=self.item_ids,
            items=self.items,
            explicit=self.explicit,
            report=self.report,
            keyed_split=self.keyed_split,
        )

    def summary(self) -> str:
        per_user = np.bincount(self.user, minlength=self.n_users)
        return (
            f"{self.name}: {self.n_users} users, {self.n_items} items, {len(self)} interactions "
            f"(per user min {per_user.min()}, median {int(np.median(per_user))}, max {per_user.max()})"
        )


def build_interactions(
    name: str,
    raw_user: list[str] | np.ndarray,
    raw_item: list[str] | np.ndarray,
    rating: np.ndarray | None,
    timestamp: np.ndarray | None,
    item_info: dict[str, ItemInfo] | None = None,
    report: list[str] | None = None,
) -> Interactions:
    """Index raw ids densely (in first-seen-sorted order), drop exact duplicate (user, item)
    pairs keeping the latest, and attach item metadata (items without metadata get their id
    as title). Every drop is counted in ``report``."""
    report = list(report or [])
    raw_user = np.asarray(raw_user).astype(str)
    raw_item = np.asarray(raw_item).astype(str)
    n = len(raw_user)
    explicit = rating is not None
    rating = np.ones(n, dtype=np.float32) if rating is None else np.asarray(rating, dtype=np.float32)
    timestamp = np.arange(n, dtype=np.float64) if timestamp is None else np.asarray(timestamp, dtype=np.float64)
    # The readers refuse these with file and line; this guard keeps a reader's slip from passing silently.
    if not (np.isfinite(rating).all() and np.isfinite(timestamp).all()):
        raise ValueError(f"{name}: ratings and timestamps must be finite (float32 ratings: |r| ≤ 3.4e38)")
    item_info = dict(item_info or {})

    user_ids, user = np.unique(raw_user, return_inverse=True)
    # Items known only from the item file (never interacted with) are kept: cold-start needs them.
    all_items = np.union1d(np.unique(raw_item), np.asarray(sorted(item_info), dtype=str)) if item_info else np.unique(raw_item)
    item = np.searchsorted(all_items, raw_item)

    # Duplicate (user, item) pairs: keep the latest (stable on ties: the last row in the file).
    order = np.lexsort((np.arange(n), timestamp, item, user))
    u_s, i_s = user[order], item[order]
    last = np.ones(n, dtype=bool)
    last[:-1] = (u_s[1:] != u_s[:-1]) | (i_s[1:] != i_s[:-1])
    keep = np.sort(order[last])
    if len(keep) < n:
        report.append(f"dropped {n - len(keep)} duplicate (user, item) rows, kept the latest of each")

    items = tuple(item_info.get(iid, ItemInfo(title=str(iid))) for iid in all_items)
    return Interactions(
        name=name,
        user=user[keep].astype(np.int64),
        item=item[keep].astype(np.int64),
        rating=rating[keep],
        timestamp=timestamp[keep],
        user_ids=tuple(str(u) for u in user_ids),
        item_ids=tuple(str(i) for i in all_items),
        items=items,
        explicit=explicit,
        report=tuple(report),
    )
