"""Andrew et al. (2023) one-shot empirical ε from random canaries, on a synthetic Gaussian mechanism
whose ε is known: right for the right noise, caught when the noise is divided by 10 (the mutant)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.canary_audit import (
    canary_cosines,
    canary_direction,
    canary_update,
    estimate_epsilon,
    gaussian_mechanism_epsilon,
    gaussian_pair_delta,
    gaussian_pair_epsilon,
)

DIM, K, SEED, DELTA = 20_000, 400, 11, 1e-5


def true_epsilon(noise_multiplier: float, rounds: int) -> float:
    """ε of ``rounds`` Gaussian releases of sensitivity 1, by dp-accounting's PLD (tight for it)."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    return pld.from_gaussian_mechanism(noise_multiplier / math.sqrt(rounds),
                                       value_discretization_interval=1e-4).get_epsilon_for_delta(DELTA)


def synthetic_run(noise_multiplier: float, rounds: int, seed: int = 0) -> np.ndarray:
    """The model delta of ``rounds`` DP-FedAvg sums in which canaries 0..K−1 took part every round
    (clip 1), each sum noised with N(0, σ²)."""
    rng = np.random.default_rng(seed)
    delta = np.zeros(DIM)
    for i in range(K):
        delta += rounds * canary_update(SEED, i, DIM, 1.0)
    return delta + rng.normal(0.0, noise_multiplier * math.sqrt(rounds), DIM)


def audit(noise_multiplier: float, rounds: int):
    delta = synthetic_run(noise_multiplier, rounds)
    return estimate_epsilon(canary_cosines(delta, SEED, range(K)), canary_cosines(delta, SEED, range(K, 2 * K)),
                            delta=DELTA, bootstrap=500)


@pytest.mark.parametrize("noise_multiplier, rounds", [(1.0, 1), (1.5, 2)])
def test_the_estimate_is_right_for_the_gaussian_mechanism(noise_multiplier, rounds):
    truth = true_epsilon(noise_multiplier, rounds)  # μ = √T/σ: 4.38 and 4.09
    est = audit(noise_multiplier, rounds)
    assert est.epsilon == pytest.approx(truth, rel=0.15)
    assert est.low <= truth <= est.high and est.lower_bound <= truth
    assert est.null[0] == pytest.approx(0.0, abs=4 * est.null[1] / math.sqrt(K))


def test_noise_divided_by_ten_is_caught():
    """The mutant of issue #14: a run that adds a tenth of the accounted noise."""
    truth = true_epsilon(1.0, 1)
    est = audit(0.1, 1)
    assert est.lower_bound > 4 * truth and est.epsilon > 5 * truth


def test_the_gaussian_pair_is_the_gaussian_mechanism_for_equal_spreads():
    for sigma in (0.5, 1.0, 3.0):
        assert gaussian_pair_epsilon(DELTA, 0.0, sigma, 1.0, sigma) == pytest.approx(true_epsilon(sigma, 1), rel=1e-4)
        assert gaussian_mechanism_epsilon(DELTA, 1 / sigma) == pytest.approx(true_epsilon(sigma, 1), rel=1e-4)
    assert gaussian_mechanism_epsilon(DELTA, -0.3) == 0.0


def test_unequal_spreads_cost_more_and_both_directions_count():
    equal = gaussian_pair_epsilon(DELTA, 0.0, 1.0, 1.0, 1.0)
    assert gaussian_pair_epsilon(DELTA, 0.0, 1.0, 1.0, 1.2) > equal
    assert gaussian_pair_epsilon(DELTA, 0.0, 1.2, 1.0, 1.0) == pytest.approx(
        gaussian_pair_epsilon(DELTA, 0.0, 1.0, 1.0, 1.2), rel=1e-9)
    for eps in (0.0, 1.0, 3.0):  # δ(ε) of one direction, by numerical integration
        x = np.linspace(-40, 40, 400_001)
        p = np.exp(-(x - 1) ** 2 / (2 * 1.44)) / math.sqrt(2 * math.pi * 1.44)
        q = np.exp(-x**2 / 2) / math.sqrt(2 * math.pi)
        numeric = max(np.trapezoid(np.maximum(p - math.exp(eps) * q, 0), x),
                      np.trapezoid(np.maximum(q - math.exp(eps) * p, 0), x))
        assert gaussian_pair_delta(eps, 0.0, 1.0, 1.0, 1.2) == pytest.approx(numeric, rel=1e-5, abs=1e-12)


def test_the_unequal_variance_estimate_is_available_and_noisier():
    delta = synthetic_run(1.0, 1)
    ins, out = canary_cosines(delta, SEED, range(K)), canary_cosines(delta, SEED, range(K, 2 * K))
    pooled = estimate_epsilon(ins, out, delta=DELTA, bootstrap=200)
    separate = estimate_epsilon(ins, out, delta=DELTA, bootstrap=200, equal_variance=False)
    assert separate.epsilon >= pooled.epsilon * 0.95
    assert separate.high - separate.low > pooled.high - pooled.low


def test_canaries_are_reproducible_unit_directions_nearly_orthogonal():
    a, b = canary_direction(SEED, 0, DIM), canary_direction(SEED, 1, DIM)
    assert np.linalg.norm(a) == pytest.approx(1.0) and np.array_equal(a, canary_direction(SEED, 0, DIM))
    assert abs(a @ b) < 5 / math.sqrt(DIM)
    assert not np.array_equal(a, canary_direction(SEED + 1, 0, DIM))
    assert np.linalg.norm(canary_update(SEED, 3, DIM, 0.7)) == pytest.approx(0.7)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 10"):
        estimate_epsilon(np.zeros(5), np.zeros(50), delta=DELTA)
    with pytest.raises(ValueError, match="non-zero"):
        canary_cosines(np.zeros(100), SEED, range(3))
    with pytest.raises(ValueError, match="delta"):
        gaussian_pair_epsilon(0.0, 0, 1, 1, 1)
