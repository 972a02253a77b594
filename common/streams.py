"""Named random streams, in one place.

Every seeded draw in fedrec (what seeded tests and experiments reproduce) comes from a NumPy
generator keyed by a list of integers: the run's seed and whatever else makes the draw its own
(round, client), followed by the stream's tag. A tag is a name here, not a hex number scattered
over five files; keys and tags are those fedrec has always used, so seeded runs draw as before.
Secret draws (cohorts, noise) do not come from here: they come from the OS CSPRNG unless a test
seeds them (common/sampling.py, common/privacy/dp_fedavg.py).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """The tag that ends a stream's key."""

    RECONSTRUCT = 0xE7A1  # BPR negatives when users are reconstructed for evaluation (key: seed)
    LOCAL_NOISE = 0x10CA1  # a device's seeded local-DP noise (key: seed, round, client)
    POOLED_NOISE = 0xDD9  # the in-process simulation's pooled distributed-DP noise (key: seed, round)
    ADAPTER = 0x7E47  # the hybrid adapter step's negatives and positives (key: seed, round, client)
    RESIDUAL_DROPOUT = 0xD0E7  # the hybrid's items trained text-only this round (key: seed, round; public)
    EVAL_SUBSET = 0xE7  # which clients validate during training (key: seed)
    SYNTHETIC = 0x5E7D  # synthetic user u resampled from a data set (key: seed, user)
    USER_SPLIT = 0x5B17  # one user's random train/valid/test split of a keyed-split data set (key: seed, user)
    TEST_SUBSET = 0x7E57  # which clients take the final test, seeded cohorts only (key: sampling seed)
    AUDIT_CLIENTS = 0xA0D1  # the leakage audit's choice of clients (key: seed)
    AUDIT_WARMUP_NOISE = 0xA0D2  # its warm-up rounds' central noise (key: seed)
    AUDIT_LOCAL_NOISE = 0xA0D3  # its local-DP observation (key: seed)
    AUDIT_AGGREGATE_NOISE = 0xA0D4  # its noised aggregate (key: seed)


def key(stream: Stream, *parts: int) -> list[int]:
    """The seed key of ``stream`` for these parts (e.g. seed, round, client)."""
    return [*(int(p) for p in parts), int(stream)]


def generator(stream: Stream, *parts: int) -> np.random.Generator:
    """A NumPy generator of ``stream`` keyed by ``parts``."""
    return np.random.default_rng(key(stream, *parts))


def client_generator(seed: int, server_round: int, client_id: int) -> np.random.Generator:
    """A client's own randomness for one round (the MF step's negatives): independent across
    clients and rounds. Its key carries no tag (it is the oldest stream)."""
    return np.random.default_rng([seed, server_round, client_id])
