"""The device's table sampler of N_Z(0, σ²): its proven distance from the discrete Gaussian, its law,
its tie-breaking on full 512-bit integers, its speed, and that the ledger charges its distance to δ."""

from __future__ import annotations

import decimal
import math
import time
from fractions import Fraction

import numpy as np
import pytest

from common.privacy import ddgauss
from common.privacy.analysis import RdpComposition
from common.privacy.ddp_event import DistributedDpEvent
from common.privacy.discrete_gaussian import RandomWords
from common.privacy.discrete_gaussian_table import (
    TABLE_BITS,
    _table,
    sample_discrete_gaussian_table,
    table_distance,
    tail_cut,
)
from common.privacy.guarantee import Relation, Sampling
from tests.test_discrete_gaussian import chi2_pvalue


def ideal_magnitudes(variance: int, k_max: int) -> list[decimal.Decimal]:
    """P(|X| = k) for k ≤ k_max of N_Z(0, σ²) at 220 digits, normalised over a support far beyond
    the table (the tail beyond 40σ is below 1e-340)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 220
        wide = max(k_max, int(40 * math.sqrt(variance)) + 40)
        two_s2 = decimal.Decimal(2 * variance)
        mass = [(-(decimal.Decimal(k * k) / two_s2)).exp() for k in range(wide + 1)]
        norm = mass[0] + 2 * sum(mass[1:])
        return [(mass[0] if k == 0 else 2 * mass[k]) / norm for k in range(k_max + 1)]


def table_l1_from_ideal(variance: int, table_variance: int | None = None) -> float:
    """Σ_x |p̃(x) − p(x)| of the table built for ``table_variance`` against N_Z(0, ``variance``)
    (the sign bit is fair, so the magnitudes' L1 is the whole law's)."""
    table = _table(table_variance or variance)
    k_max = len(table.cumulative) - 1
    ideal = ideal_magnitudes(variance, k_max)
    with decimal.localcontext() as ctx:
        ctx.prec = 220
        scale = decimal.Decimal(2) ** TABLE_BITS
        previous, l1 = 0, decimal.Decimal(0)
        for k in range(k_max + 1):
            c = table.cdf(k)
            l1 += abs(decimal.Decimal(c - previous) / scale - ideal[k])
            previous = c
        l1 += 1 - sum(ideal)  # the mass beyond the table, which the sampler never draws
        return float(l1)


@pytest.mark.parametrize("variance", [1, 2, 7, 1000])
def test_the_table_is_within_its_proven_distance_of_the_discrete_gaussian(variance):
    measured = table_l1_from_ideal(variance) / 2  # total variation
    assert 0 < measured <= table_distance(variance)
    assert table_distance(variance) < 1e-140


def test_the_same_measurement_catches_a_table_for_the_wrong_variance():
    """The check above can fail: a table one grid unit of variance off is 1e-3 away, not 1e-148."""
    assert table_l1_from_ideal(1000, table_variance=1001) / 2 > 1e-6 > table_distance(1000)


@pytest.mark.parametrize("variance", [1, 2, 7, 50])
def test_the_table_sampler_draws_the_discrete_gaussian(variance):
    samples = sample_discrete_gaussian_table(variance, 200_000, RandomWords(seed=variance))
    assert samples.dtype == np.int64
    assert chi2_pvalue(samples, variance) > 1e-3


def test_a_large_share_has_mean_zero_variance_sigma_squared_and_symmetric_tails():
    variance, n = 24_774_182, 131_072  # a device's share on ML-100K at 20 bits
    x = sample_discrete_gaussian_table(variance, n, RandomWords(seed=3))
    sd = math.sqrt(variance)
    assert abs(x.mean()) < 4 * sd / math.sqrt(n)
    assert abs(x.var() / variance - 1.0) < 4 * math.sqrt(2 / n)
    assert abs(int(np.sum(x > 0)) - int(np.sum(x < 0))) < 4 * math.sqrt(n)
    assert np.abs(x).max() < 7 * sd


class _Scripted(RandomWords):
    """Words from a script first (to force ties with the table's top words), then seeded ones."""

    def __init__(self, first: np.ndarray) -> None:
        super().__init__(seed=0)
        self._first = np.asarray(first, dtype=np.uint64)

    def words(self, n: int) -> np.ndarray:
        if self._first.size:
            out, self._first = self._first[:n], self._first[n:]
            return out if out.size == n else np.concatenate([out, super().words(n - out.size)])
        return super().words(n)


def test_a_tie_on_the_top_64_bits_is_decided_on_all_512():
    variance = 7
    table = _table(variance)
    ties = table.top[:6].copy()  # U's top word equal to the top word of entries 0..5
    src = _Scripted(ties)
    got = np.abs(sample_discrete_gaussian_table(variance, ties.size, src))
    # Re-draw the same stream to know each U's lower 448 bits, then invert on full integers.
    replay = _Scripted(ties)
    replay.words(ties.size)
    for i, top in enumerate(ties):
        u = int(top)
        for word in replay.words(TABLE_BITS // 64 - 1):
            u = (u << 64) | int(word)
        assert got[i] == next(k for k in range(len(table.cumulative)) if u < table.cdf(k))


def test_a_device_share_is_sampled_in_a_few_tens_of_milliseconds():
    """131,072 draws at the ML-100K share (the exact sampler takes ~0.2 s); table built once."""
    sample_discrete_gaussian_table(24_774_182, 10)
    start = time.process_time()
    sample_discrete_gaussian_table(24_774_182, 131_072)
    assert time.process_time() - start < 0.1


def test_the_tail_cut_leaves_less_than_the_claimed_mass():
    for variance in (1, 10, 10**6):
        k = tail_cut(variance)
        mass = 2 * math.exp(-k * k / (2 * variance)) / -math.expm1(-k / variance)
        assert mass <= 2.0 ** -(TABLE_BITS + 8)


def _event(distance: float) -> DistributedDpEvent:
    return DistributedDpEvent(clip=1.0, gamma=2.37e-5, local_variance=24_774_182, survivors=94, max_survivors=154,
                              dim=131_072, beta=ddgauss.DEFAULT_BETA, sample_rate=0.1, sampling=Sampling.POISSON,
                              parameters=("item_emb",), round=1, steps=150, sampler_distance=distance)


def test_the_ledger_adds_the_samplers_distance_to_delta():
    exact = _event(0.0).release(Relation.ADD_OR_REMOVE_ONE)
    table = _event(table_distance(24_774_182)).release(Relation.ADD_OR_REMOVE_ONE)
    assert table.sampler_slack == pytest.approx(154 * 131_072 * table_distance(24_774_182))
    a, b = RdpComposition().then(exact), RdpComposition().then(table)
    assert b.slack == pytest.approx(150 * table.sampler_slack)
    assert b.epsilon(1e-4) == pytest.approx(a.epsilon(1e-4), rel=1e-12)  # 1e-138 moves no digit
    # A slack that matters raises ε, and one that would eat δ leaves no finite ε proven.
    noticeable = RdpComposition(a.rdp, slack=1e-8)
    assert noticeable.epsilon(1e-4) > a.epsilon(1e-4)
    assert RdpComposition(a.rdp, slack=1e-6).epsilon(1e-4) == math.inf
    # The table's slack survives the ε a run has against the server (no amplification, ~100+).
    server = RdpComposition().then(_event(table_distance(24_774_182)).release(Relation.ADD_OR_REMOVE_ONE,
                                                                               amplification=False))
    assert 50 < server.epsilon(1e-4) < math.inf


def test_an_event_keeps_its_sampler_distance_and_old_events_load_as_exact():
    event = _event(table_distance(100))
    assert DistributedDpEvent.from_dict(event.to_dict()) == event
    old = {k: v for k, v in event.to_dict().items() if k != "sampler_distance"}
    assert DistributedDpEvent.from_dict(old).sampler_distance == 0.0
    with pytest.raises(ValueError, match="sampler_distance"):
        _event(0.5)


def test_the_cumulative_table_is_a_distribution():
    table = _table(1000)
    assert table.cdf(len(table.cumulative) - 1) == 1 << TABLE_BITS
    cdf = [table.cdf(k) for k in range(len(table.cumulative))]
    assert all(a <= b for a, b in zip(cdf, cdf[1:]))
    assert all(int(t) == c >> (TABLE_BITS - 64) for t, c in zip(table.top[:-1], cdf))
    assert Fraction(table.cdf(0), 1 << TABLE_BITS) == pytest.approx(float(ideal_magnitudes(1000, 0)[0]), rel=1e-12)
