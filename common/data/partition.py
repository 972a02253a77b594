"""Client partitions: one user per client (cross-device) or K silos of users (cross-silo)."""

from __future__ import annotations

import numpy as np

from common.choices import Partition, values

PARTITIONS = values(Partition)


def partition_users(n_users: int, kind: str = "user", *, num_silos: int = 10, seed: int = 0) -> list[np.ndarray]:
    """User indices held by each client.

    ``user``: client ``c`` holds user ``c``. ``silo``: users are shuffled (seeded) and dealt
    into ``num_silos`` groups of near-equal size.
    """
    if kind == "user":
        return [np.array([u], dtype=np.int64) for u in range(n_users)]
    if kind == "silo":
        if not 1 <= num_silos <= n_users:
            raise ValueError(f"num_silos must be between 1 and {n_users}, got {num_silos}")
        perm = np.random.default_rng(seed).permutation(n_users)
        return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_silos)]
    raise ValueError(f"unknown partition {kind!r}; expected one of {', '.join(PARTITIONS)}")
