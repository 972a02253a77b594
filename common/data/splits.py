"""Deterministic, seeded train/validation/test splits.

``random``          per-user random 80/10/10 (RecBole's ``RO`` split with ``group_by=user``, so
                    published ML-100K numbers compare).
``leave-last-out``  per user by timestamp: test = last, validation = second last.
``cold-item``       a fraction of items is held out with all their interactions (the cold
                    items); the warm interactions are split per-user random 80/10/10.

A data set with ``keyed_split`` (the synthetic sources) draws each user's random permutation
from a generator of its own, keyed by (seed, user): :func:`user_parts` splits one user from that
user's rows alone, and the whole-data split gives every user the same rows (a simulated client,
the central trainer and the server see one split). Leave-last-out needs no draw and is per user
anyway. The cold-item split keeps one generator for the whole data set (the cold items are a
global draw), keyed or not: a client of a cold-item run needs the whole data set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.choices import Split as SplitKind
from common.choices import values
from common.data.dataset import Interactions
from common.streams import Stream, generator

SPLITS = values(SplitKind)


@dataclass(frozen=True)
class Split:
    """Three disjoint subsets of one data set, sharing its id space.

    ``cold_items`` are item indices with no interaction in ``train`` or ``valid`` (empty for
    the warm splits); ``cold_test`` holds all their interactions.
    """

    train: Interactions
    valid: Interactions
    test: Interactions
    cold_items: np.ndarray
    cold_test: Interactions
    kind: str
    seed: int

    @property
    def n_users(self) -> int:
        return self.train.n_users

    @property
    def n_items(self) -> int:
        return self.train.n_items


def _ratio_counts(total: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """RecBole's ``_calcu_split_ids``: valid/test get floor(r·n), train the rest, and a part whose
    share is between 0 and 1 row gets one row while train keeps more than one."""
    cnt = [int(r * total) for r in ratios]
    cnt[0] = total - sum(cnt[1:])
    for i in range(1, len(ratios)):
        if cnt[0] <= 1:
            break
        if 0 < ratios[-i] * total < 1:
            cnt[-i] += 1
            cnt[0] -= 1
    return cnt[0], cnt[1], cnt[2]


def _per_user_random(data: Interactions, rows: np.ndarray, rng: np.random.Generator,
                     ratios: tuple[float, float, float]) -> np.ndarray:
    """Assign each row in ``rows`` to 0/1/2 (train/valid/test), per user, at random."""
    part = np.zeros(len(data), dtype=np.int8)
    users = data.user[rows]
    order = np.argsort(users, kind="stable")
    sorted_rows = rows[order]
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    for group in np.split(sorted_rows, bounds):
        if len(group) == 0:
            continue
        group = group[rng.permutation(len(group))]
        n_tr, n_va, _ = _ratio_counts(len(group), ratios)
        part[group[n_tr:n_tr + n_va]] = 1
        part[group[n_tr + n_va:]] = 2
    return part


def user_parts(user: int, timestamps: np.ndarray, kind: str, *, seed: int,
               ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> np.ndarray:
    """0/1/2 (train/valid/test) for each of one user's rows, in data order, of a ``keyed_split``
    data set: what :func:`split_interactions` gives that user's rows (kind "random" or
    "leave-last-out"). ``timestamps``: the user's rows' timestamps (only their count matters for
    "random")."""
    n = len(timestamps)
    part = np.zeros(n, dtype=np.int8)
    if kind == SplitKind.RANDOM:
        perm = generator(Stream.USER_SPLIT, seed, user).permutation(n)
        n_tr, n_va, _ = _ratio_counts(n, ratios)
        part[perm[n_tr:n_tr + n_va]] = 1
        part[perm[n_tr + n_va:]] = 2
    elif kind == SplitKind.LEAVE_LAST_OUT:
        order = np.lexsort((np.arange(n), np.asarray(timestamps)))
        if n >= 2:  # as _leave_last_out: one row stays in train, two give no validation row
            part[order[-1]] = 2
        if n >= 3:
            part[order[-2]] = 1
    else:
        raise ValueError(f"a split of one user alone is 'random' or 'leave-last-out', not {kind!r}")
    return part


def _keyed_random(data: Interactions, seed: int, ratios: tuple[float, float, float]) -> np.ndarray:
    """The random split of a ``keyed_split`` data set: :func:`user_parts` for every user."""
    part = np.zeros(len(data), dtype=np.int8)
    order = np.argsort(data.user, kind="stable")  # each user's rows in data order
    bounds = np.flatnonzero(np.diff(data.user[order])) + 1
    for group in np.split(order, bounds):
        if len(group):
            part[group] = user_parts(int(data.user[group[0]]), data.timestamp[group], SplitKind.RANDOM,
                                     seed=seed, ratios=ratios)
    return part


def _leave_last_out(data: Interactions) -> np.ndarray:
    part = np.zeros(len(data), dtype=np.int8)
    order = np.lexsort((np.arange(len(data)), data.timestamp, data.user))
    users = data.user[order]
    last = np.r_[users[1:] != users[:-1], True]
    second = np.r_[last[1:], False] & ~last
    # A user with a single interaction keeps it for training; with two, no validation row.
    counts = np.bincount(users, minlength=data.n_users)
    part[order[last & (counts[users] >= 2)]] = 2
    part[order[second & (counts[users] >= 3)]] = 1
    return part


def split_interactions(data: Interactions, kind: str = "random", *, seed: int = 0,
                       ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
                       cold_fraction: float = 0.2) -> Split:
    """Split ``data`` (see module docstring). Same inputs and seed give the same split."""
    if kind not in SPLITS:
        raise ValueError(f"unknown split {kind!r}; expected one of {', '.join(SPLITS)}")
    if abs(sum(ratios) - 1.0) > 1e-9 or min(ratios) < 0:
        raise ValueError(f"split ratios must be non-negative and sum to 1, got {ratios}")
    rng = np.random.default_rng(seed)
    all_rows = np.arange(len(data))
    cold_items = np.array([], dtype=np.int64)
    is_cold = np.zeros(len(data), dtype=bool)
    if kind == "cold-item":
        if not 0 < cold_fraction < 1:
            raise ValueError(f"cold_fraction must be in (0, 1), got {cold_fraction}")
        seen = np.unique(data.item)
        n_cold = int(round(cold_fraction * len(seen)))
        cold_items = np.sort(rng.choice(seen, size=n_cold, replace=False))
        is_cold = np.isin(data.item, cold_items)
    if kind == "leave-last-out":
        part = _leave_last_out(data)
    elif kind == "random" and data.keyed_split:
        part = _keyed_random(data, seed, ratios)
    else:
        part = _per_user_random(data, all_rows[~is_cold], rng, ratios)
    part[is_cold] = 3
    return Split(
        train=data.subset(part == 0),
        valid=data.subset(part == 1),
        test=data.subset(part == 2),
        cold_items=cold_items,
        cold_test=data.subset(part == 3),
        kind=kind,
        seed=seed,
    )
