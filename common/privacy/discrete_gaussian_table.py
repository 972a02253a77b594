"""Discrete Gaussian noise by inversion of a 512-bit cumulative table: the device's sampler.

The exact sampler of [CKS20] (:mod:`common.privacy.discrete_gaussian`) spends ~0.23 s and ~13 MB
of OS randomness on the 131,072 draws of one device's share (σ ≈ 5,000 grid units), which made
a distributed-DP round 3× slower than a central one. This sampler draws |X| by inverting a
cumulative distribution table held to ``TABLE_BITS`` = 512 bits (the method of lattice
cryptography's CDT samplers), plus one fair sign bit: one 64-bit word per draw and a binary
search, ~7 ms for the same share.

It is not exact, and the privacy accounting says by how much. :func:`table_distance` is a proven
upper bound η on the total-variation distance between one draw and N_Z(0, σ²); every device draw
in a release adds its η to the ledger's δ (:class:`~common.privacy.ddp_event.DistributedDpEvent`,
``sampler_distance``), which converts it as (ε, δ + (1 + e^ε)·Σ η) (a mechanism within η in
total variation of an (ε, δ)-DP one is (ε, δ + (1 + e^ε)η)-DP). At ``TABLE_BITS`` = 512, η ≈ 2e-149 per draw at the ML-100K
share and Σ η over a 150-round run of 154 devices × 131,072 draws is ~6e-140: it moves no printed
digit, and
the conversion holds up to ε ≈ 300 (the ε a run has against the server is ~100; a larger one is
reported as ∞, which is always a valid bound). Where η comes from:

* **tail**: the table stops at K with 2·e^{−K²/2σ²}/(1 − e^{−K/σ²}) ≤ 2^{−(TABLE_BITS+8)} (mass
  beyond ±K; the normaliser is ≥ 1, its k = 0 term);
* **weights**: w_k ≈ 2^P·e^{−k²/2σ²} by the recurrence w_k = w_{k−1}·e^{−(2k−1)/2σ²} in P = 576-bit
  fixed point, from two constants within 2 units of 2^{−P} (:mod:`decimal`); each step truncates
  once, so the ratio is within 3k units and |w_k − 2^P e_k| ≤ Σ_j (3j + 1) ≤ 2(k + 1)² units;
  normalising at most doubles the L1 error;
* **table**: each cumulative value is rounded down to 2^{−TABLE_BITS}: ≤ 2·2^{−TABLE_BITS} per entry.

A draw compares the first 64 bits of a uniform 512-bit U with the table's first 64 bits; only
when they tie with an entry (probability ≤ K·2^{−64}) are the remaining 448 bits drawn and the
comparison finished on full integers, so the inversion is exact for the table. (It is not constant
time: the tie path and the binary search depend on the value drawn; the device's own process is
the only observer of that timing in fedrec's threat model.)
"""

from __future__ import annotations

import decimal
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from common.privacy.discrete_gaussian import RandomWords

#: Bits of the cumulative table: the resolution of every probability the sampler realises.
TABLE_BITS = 512
#: Fixed-point bits of the weights the table is normalised from (their error is ≤ 2(k + 1)² units).
_WORK_BITS = 576
#: Buckets of the guide table (2^18 of the uniform word's range): a draw looks its answer up in
#: O(1) unless its bucket holds an entry boundary, which is then found by binary search.
GUIDE_BITS = 18
#: Bits of slack kept beyond TABLE_BITS in the tail cut.
_TAIL_MARGIN_BITS = 8
_LN2 = math.log(2.0)


def tail_cut(variance: int) -> int:
    """K: the smallest integer with 2·e^{−K²/2σ²}/(1 − e^{−K/σ²}) ≤ 2^{−(TABLE_BITS + 8)}, the
    mass of N_Z(0, σ²) beyond ±K (times its normaliser, which is ≥ 1). Floats suffice: the test
    asks for two bits more than the bound claims."""
    _check_variance(variance)
    s2 = float(variance)
    limit = -(TABLE_BITS + _TAIL_MARGIN_BITS + 2) * _LN2

    def log_tail(k: int) -> float:
        return _LN2 - k * k / (2 * s2) - math.log(-math.expm1(-k / s2))

    k = max(1, int(math.sqrt(2 * s2 * (TABLE_BITS + _TAIL_MARGIN_BITS) * _LN2)))
    while log_tail(k) > limit:
        k += max(1, k // 1000)
    return k


def table_distance(variance: int) -> float:
    """η: an upper bound on the total-variation distance between one draw of
    :func:`sample_discrete_gaussian_table` and N_Z(0, σ²) (the three terms of the module's note)."""
    k = tail_cut(variance)
    tail = 2.0 ** -(TABLE_BITS + _TAIL_MARGIN_BITS)
    # Σ_k |a_k − a*_k| ≤ Σ_k 2·2(k+1)² ulps (a_k = 2w_k), doubled by normalising, over W ≥ 2^P
    weights = 8.0 * float(k + 1) ** 3 * 2.0 ** -_WORK_BITS
    table = 2.0 * (k + 1) * 2.0 ** -TABLE_BITS
    return tail + weights + table


@dataclass(frozen=True)
class _Table:
    """The cumulative table of |X| for one variance: ``cdf(k)`` = ⌊2^TABLE_BITS·W_k/W⌋ with W_k the
    fixed-point weights' prefix sums and W their total (``cdf(K)`` = 2^TABLE_BITS exactly), and
    ``top[k]`` = ⌊2^64·W_k/W⌋ = ``cdf(k)`` >> (TABLE_BITS − 64), the only part most draws read.
    Full entries are computed on demand (a tie on the top word is rare, and a division with a
    512-bit quotient per entry would triple the table's build time)."""

    cumulative: tuple[int, ...]
    total: int
    top: np.ndarray
    #: guide[b]: the first entry whose top word exceeds b·2^(64−GUIDE_BITS), for b ≤ 2^GUIDE_BITS;
    #: a draw whose bucket holds no entry boundary (guide[b] = guide[b+1]) is answered by it.
    guide: np.ndarray

    def cdf(self, k: int) -> int:
        if k == len(self.cumulative) - 1:
            return 1 << TABLE_BITS
        return (self.cumulative[k] << TABLE_BITS) // self.total


def _fixed(numerator: int, denominator: int, bits: int) -> int:
    """⌊2^bits · exp(−numerator/denominator)⌋, from :mod:`decimal` at 200 digits (the quotient and
    the exponential each correctly rounded): within 2 units of the last place."""
    with decimal.localcontext() as ctx:
        ctx.prec = 200
        value = (-(decimal.Decimal(numerator) / decimal.Decimal(denominator))).exp()
        return int(value * (decimal.Decimal(2) ** bits))


@lru_cache(maxsize=2)  # one per round's σ²; ~15 MB each at the ML-100K share
def _table(variance: int) -> _Table:
    k_max = tail_cut(variance)
    p = _WORK_BITS
    g = _fixed(1, 2 * variance, p)  # e^{−1/2σ²}: the ratio w_1/w_0
    h = _fixed(1, variance, p)  # e^{−1/σ²}: how that ratio shrinks per step
    ratio, weight = g, 1 << p
    cumulative = [weight]  # |X| = 0 once, |X| = k > 0 twice (±k)
    total = weight
    for _ in range(1, k_max + 1):
        weight = (weight * ratio) >> p
        ratio = (ratio * h) >> p
        total += 2 * weight
        cumulative.append(total)
    # ⌊2^64·c/W⌋ is ⌊⌊2^TABLE_BITS·c/W⌋ / 2^(TABLE_BITS−64)⌋: the top word of each entry, exactly.
    top = np.array([(c << 64) // total for c in cumulative[:-1]] + [(1 << 64) - 1], dtype=np.uint64)
    starts = np.arange(1 << GUIDE_BITS, dtype=np.uint64) << np.uint64(64 - GUIDE_BITS)
    guide = np.append(np.searchsorted(top, starts, side="right"), len(top)).astype(np.int64)
    top.setflags(write=False)  # shared by every later draw of this σ² (lru_cache): nobody may write
    guide.setflags(write=False)
    return _Table(cumulative=tuple(cumulative), total=total, top=top, guide=guide)


def sample_discrete_gaussian_table(variance: int, size: int, src: RandomWords | None = None) -> np.ndarray:
    """``size`` draws of N_Z(0, σ²) (σ² = ``variance``, a positive integer), each within
    :func:`table_distance` of it in total variation.

    Parameters
    ----------
    variance:
        σ² in grid units (a device rounds its planned share up).
    size:
        Number of draws (≥ 0).
    src:
        Source of uniform words; ``None`` is the OS CSPRNG.
    """
    _check_variance(variance)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    src = RandomWords() if src is None else src
    table = _table(int(variance))
    words = src.words(size)
    # The first index whose cumulative top word exceeds U's top word; a tie with an earlier entry
    # (U's top word equal to its top word) is decided on all TABLE_BITS bits below.
    bucket = (words >> np.uint64(64 - GUIDE_BITS)).astype(np.int64)
    magnitude = table.guide[bucket]
    open_ = np.flatnonzero(magnitude != table.guide[bucket + 1])
    magnitude[open_] = np.searchsorted(table.top, words[open_], side="right")
    tied = np.flatnonzero((magnitude > 0) & (table.top[np.maximum(magnitude - 1, 0)] == words))
    rest = TABLE_BITS // 64 - 1
    for i in tied:
        u = int(words[i])
        for word in src.words(rest):
            u = (u << 64) | int(word)
        k = int(magnitude[i]) - 1
        while k >= 0 and u < table.cdf(k):
            k -= 1
        magnitude[i] = k + 1
    signs = np.unpackbits(src.words((size + 63) // 64).view(np.uint8))[:size].astype(bool)
    return np.where(signs, -magnitude, magnitude)


def _check_variance(variance: int) -> None:
    if isinstance(variance, bool) or not isinstance(variance, (int, np.integer)) or variance < 1:
        raise ValueError(f"variance must be a positive integer, got {variance!r}")
    if variance > 2**50:
        raise ValueError(f"variance {variance} is too large for the table sampler (at most 2^50)")
