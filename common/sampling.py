"""Who takes part in a round: Poisson sampling whose cohorts nobody can predict.

Amplification by subsampling -- what lets DP-FedAvg charge a user only ``q`` of a round -- holds
against an observer who does not know whether the user was sampled. So each client's
Bernoulli(q) draw is

* **independent** of every other client's (removing one user changes nobody else's draw: the
  add/remove analysis assumes exactly that), and
* **secret**: by default it comes from the operating system's CSPRNG (``os.urandom``), is never
  derived from anything in the run's configuration, and the cohort is never written to a run
  artefact (the run directory keeps counts only).

A seeded draw exists for tests and reproducible experiments (``fed.sampling-seed ≥ 0``): each
client's coin is then a hash of (seed, round, client id), so cohorts are reproducible by anyone
who holds ``config.json``, and the privacy report says that the guarantee's sampling assumption
did not hold for that run.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

import numpy as np

from common.streams import Stream, generator

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Odd 64-bit constants (golden ratio and two splitmix64 multipliers) to spread the key fields.
_K_SEED, _K_ROUND, _K_CLIENT = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (a bijective 64-bit mix), elementwise on uint64."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _K_ROUND
        x = (x ^ (x >> np.uint64(27))) * _K_CLIENT
        return x ^ (x >> np.uint64(31))


def uniform_coins(client_ids: np.ndarray, *, seed: int | None, server_round: int) -> np.ndarray:
    """One uniform number in [0, 1) per client, independent across clients.

    ``seed`` None: 53-bit uniforms from ``os.urandom`` (secret). Otherwise a keyed hash of
    (seed, round, client id): reproducible, and still one independent coin per client.
    """
    n = len(client_ids)
    if seed is None:
        raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    else:
        ids = np.asarray(client_ids, dtype=np.int64).astype(np.uint64)
        with np.errstate(over="ignore"):
            key = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _K_SEED
                              + np.uint64(server_round & 0xFFFFFFFFFFFFFFFF) * _K_ROUND)
            raw = _splitmix64(_splitmix64(key ^ (ids * _K_CLIENT)) + ids)
    return (raw >> np.uint64(11)).astype(np.float64) / 2.0**53


def poisson_sample(client_ids: Iterable[int], rate: float, *, seed: int | None, server_round: int) -> list[int]:
    """The clients that join this round: each independently with probability ``rate``.

    ``seed=None`` (what every run uses unless ``fed.sampling-seed`` is set): secret cohorts from
    the OS CSPRNG. An int: reproducible cohorts for tests -- NOT secret. Returns the chosen ids
    in increasing order.
    """
    if not 0 < rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {rate}")
    ids = np.array(sorted(set(int(c) for c in client_ids)), dtype=np.int64)
    if rate == 1.0:
        return [int(c) for c in ids]
    coins = uniform_coins(ids, seed=seed, server_round=server_round)
    return [int(c) for c in ids[coins < rate]]


def uniform_subset(client_ids: Iterable[int], size: int, *, seed: int | None) -> list[int]:
    """``size`` clients drawn uniformly without replacement (the final test's sample); all of
    them when ``size`` is 0 or at least their number. Returns the chosen ids in increasing order.

    ``seed=None``: from the OS CSPRNG (``random.SystemRandom`` reads ``os.urandom``, the source of
    the secret cohorts above), so that no client can predict whether it is evaluated. An int (the
    run's ``fed.sampling-seed``): the seeded stream ``TEST_SUBSET`` -- reproducible, NOT secret.
    """
    if size < 0:
        raise ValueError(f"sample size must be ≥ 0, got {size}")
    ids = sorted(set(int(c) for c in client_ids))
    if size == 0 or size >= len(ids):
        return ids
    if seed is None:
        return sorted(random.SystemRandom().sample(ids, size))
    pick = generator(Stream.TEST_SUBSET, seed).choice(len(ids), size=size, replace=False)
    return [ids[i] for i in sorted(int(i) for i in pick)]
