"""The exact discrete Gaussian sampler (Canonne, Kamath, Steinke 2020): its law, symmetry,
variance, speed, and that the OS CSPRNG is the default."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.stats import chisquare

from common.privacy.discrete_gaussian import RandomWords, discrete_laplace, sample_discrete_gaussian


def exact_pmf(variance: float, support: np.ndarray) -> np.ndarray:
    """N_Z(0, σ²): mass ∝ exp(−x²/(2σ²)) on the integers, normalised over a support wide enough."""
    wide = np.arange(-60 * math.ceil(math.sqrt(variance)) - 60, 60 * math.ceil(math.sqrt(variance)) + 61)
    norm = np.exp(-wide.astype(float) ** 2 / (2 * variance)).sum()
    return np.exp(-support.astype(float) ** 2 / (2 * variance)) / norm


def chi2_pvalue(samples: np.ndarray, variance: float) -> float:
    """χ² goodness of fit against the exact law, cells |x| ≤ 4σ plus the two tails."""
    k = int(4 * math.sqrt(variance)) + 1
    support = np.arange(-k, k + 1)
    pmf = exact_pmf(variance, support)
    tail = (1.0 - pmf.sum()) / 2
    observed = [np.sum(samples < -k), *[np.sum(samples == x) for x in support], np.sum(samples > k)]
    expected = np.array([tail, *pmf, tail]) * samples.size
    return float(chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("variance", [1, 2, 7])
def test_the_sampler_draws_the_exact_discrete_gaussian(variance):
    samples = sample_discrete_gaussian(variance, 200_000, RandomWords(seed=variance))
    assert samples.dtype == np.int64
    assert chi2_pvalue(samples, variance) > 1e-3


def test_a_rounded_continuous_gaussian_fails_the_same_test():
    """The mutant: N(0, 1) rounded to the nearest integer puts 0.383 on 0 instead of 0.399."""
    rounded = np.rint(np.random.default_rng(0).normal(0.0, 1.0, 200_000)).astype(np.int64)
    assert chi2_pvalue(rounded, 1) < 1e-9


@pytest.mark.parametrize("variance", [3, 10**6, 10**13])  # 10**13: the exact big-integer path
def test_the_noise_is_symmetric_with_variance_sigma_squared(variance):
    n = 120_000
    x = sample_discrete_gaussian(variance, n, RandomWords(seed=11))
    sd = math.sqrt(variance)
    assert abs(x.mean()) < 4 * sd / math.sqrt(n)
    assert abs(int(np.sum(x > 0)) - int(np.sum(x < 0))) < 4 * math.sqrt(n)  # sign test
    assert abs(x.var() / variance - 1.0) < 4 * math.sqrt(2 / n)  # [CKS20]: Var is σ² less a vanishing term
    q = np.quantile(x, [0.01, 0.1, 0.5, 0.9, 0.99])
    assert np.allclose(q, -q[::-1], atol=0.05 * sd + 1)


def test_the_discrete_laplace_has_its_law():
    scale, n = 3, 200_000
    x = discrete_laplace(scale, n, RandomWords(seed=5))
    support = np.arange(-12, 13)
    pmf = np.exp(-np.abs(support) / scale) * (1 - math.exp(-1 / scale)) / (1 + math.exp(-1 / scale))
    observed = [np.sum(x < -12), *[np.sum(x == v) for v in support], np.sum(x > 12)]
    tail = (1 - pmf.sum()) / 2
    assert chisquare(observed, np.array([tail, *pmf, tail]) * n).pvalue > 1e-3


def test_uniform_integers_are_exact_for_any_bound():
    src = RandomWords(seed=3)
    for bound in (3, 1 << 20, (1 << 40) + 7):
        draws = src.below(np.full(90_000, bound, dtype=np.uint64)).astype(float)
        assert draws.max() < bound and draws.min() >= 0
        assert abs(draws.mean() / (bound - 1) - 0.5) < 0.01
    counts = np.bincount(src.below(np.full(90_000, 3, dtype=np.uint64)).astype(int), minlength=3)
    assert chisquare(counts).pvalue > 1e-3


def test_noise_comes_from_the_os_csprng_by_default_and_a_seed_is_reproducible():
    assert RandomWords().secure and not RandomWords(seed=1).secure
    a, b = sample_discrete_gaussian(10**6, 1000), sample_discrete_gaussian(10**6, 1000)
    assert not np.array_equal(a, b)
    seeded = [sample_discrete_gaussian(10**6, 1000, RandomWords(seed=9)) for _ in range(2)]
    assert np.array_equal(*seeded)


def test_a_model_update_is_noised_in_well_under_a_second():
    """110k coordinates (ML-100K's item side) of the CSPRNG sampler, CPU time of this process."""
    start = time.process_time()
    sample_discrete_gaussian(26_769_506, 110_000)
    assert time.process_time() - start < 0.8


@pytest.mark.parametrize("variance", [0, -1, 1.5, True])
def test_the_variance_must_be_a_positive_integer(variance):
    with pytest.raises(ValueError, match="positive integer"):
        sample_discrete_gaussian(variance, 10)
