"""One-shot empirical privacy estimation with random canary clients (Andrew et al. 2023).

Andrew, Kairouz, Oh, Oprea, McMahan and Suriyakumar, "One-shot Empirical Privacy Estimation for
Federated Learning" (arXiv 2302.03098, ICLR 2024). Pure functions; the run that inserts the
canaries is someone else's:

1. :func:`canary_direction`: k random directions, uniform on the unit sphere of the model
   delta's space, each a function of (seed, index) so a canary client and the auditor agree.
   A canary client whose index is *inserted* answers every round it is sampled in with
   C·direction (:func:`canary_update`); the *held-out* indices are never inserted.
2. After training, :func:`canary_cosines` of each canary with the final model delta.
3. :func:`estimate_epsilon`: fit a Gaussian to the held-out cosines (the null) and one to the
   inserted cosines (the alternative). By default (``equal_variance=True``) the estimate is the
   ε at δ of the Gaussian mechanism whose separation they show, μ = (mean_in − mean_out)/s with s
   the pooled standard deviation: under the Gaussian mechanism both cosine distributions have the
   same spread, and the paper's estimate is right for it in high dimension. ``equal_variance=False``
   uses the two fitted Gaussians as they are (:func:`gaussian_pair_epsilon`, exact for unequal
   variances); at small δ that ε is very sensitive to the sampling error of the two spreads.
   For mechanisms other than the Gaussian the estimate is an estimate, not a bound.

Confidence: a percentile **bootstrap** over canaries (both sets resampled), not an analytic
interval; ``low`` is the one-sided lower confidence bound at the requested level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_EPS_MAX = 500.0


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """a·b without BLAS (a multithreaded BLAS dot stalls for milliseconds on a busy machine)."""
    return float(np.einsum("i,i->", a, b))


def canary_direction(seed: int, index: int, dim: int) -> np.ndarray:
    """Canary ``index``'s unit direction in ``dim`` coordinates (float64), uniform on the sphere."""
    if dim < 2 or index < 0:
        raise ValueError(f"need dim >= 2 and index >= 0, got {dim}, {index}")
    g = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xCA7A, int(index)]).standard_normal(dim)
    return g / math.sqrt(_dot(g, g))


def canary_update(seed: int, index: int, dim: int, clip: float) -> np.ndarray:
    """What an inserted canary client sends when sampled: its direction at the clip norm."""
    return clip * canary_direction(seed, index, dim)


def canary_cosines(delta: np.ndarray, seed: int, indices: range | list[int]) -> np.ndarray:
    """Cosine of each canary direction in ``indices`` with the flat final model delta."""
    flat = np.asarray(delta, dtype=np.float64).ravel()
    norm = math.sqrt(_dot(flat, flat))
    if norm == 0.0 or not math.isfinite(norm):
        raise ValueError("the model delta must be finite and non-zero")
    return np.array([_dot(canary_direction(seed, i, flat.size), flat) / norm for i in indices])


def _log_phi(x: float) -> float:
    """log Φ(x), accurate in both tails."""
    if x > -5.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    from scipy.special import log_ndtr

    return float(log_ndtr(x))


def _mass(mu: float, sd: float, intervals: list[tuple[float, float]]) -> float:
    """P(N(mu, sd²) ∈ union of disjoint ``intervals``)."""
    total = 0.0
    for lo, hi in intervals:
        a, b = (lo - mu) / sd, (hi - mu) / sd
        if b <= 0:  # both in the lower tail: Φ(b) − Φ(a)
            total += math.exp(_log_phi(b)) - math.exp(_log_phi(a))
        else:  # use the upper tails: Φ(−a) − Φ(−b)
            total += math.exp(_log_phi(-a)) - math.exp(_log_phi(-b))
    return max(total, 0.0)


def _delta_one_way(eps: float, mu_p: float, sd_p: float, mu_q: float, sd_q: float) -> float:
    """sup_S P(S) − e^ε·Q(S) for P = N(mu_p, sd_p²), Q = N(mu_q, sd_q²): the set where
    log p − log q > ε is where a quadratic a·x² + b·x + c is positive."""
    a = 0.5 / sd_q**2 - 0.5 / sd_p**2
    b = mu_p / sd_p**2 - mu_q / sd_q**2
    c = mu_q**2 / (2 * sd_q**2) - mu_p**2 / (2 * sd_p**2) + math.log(sd_q / sd_p) - eps
    inf = math.inf
    if abs(a) < 1e-12 * max(0.5 / sd_q**2, 0.5 / sd_p**2):
        if b == 0.0:
            region = [(-inf, inf)] if c > 0 else []
        else:
            root = -c / b
            region = [(root, inf)] if b > 0 else [(-inf, root)]
    else:
        disc = b * b - 4 * a * c
        if disc <= 0:
            region = [(-inf, inf)] if a > 0 else []
        else:
            r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
            region = [(-inf, r1), (r2, inf)] if a > 0 else [(r1, r2)]
    return max(0.0, _mass(mu_p, sd_p, region) - math.exp(eps) * _mass(mu_q, sd_q, region))


def gaussian_pair_delta(eps: float, mu0: float, sd0: float, mu1: float, sd1: float) -> float:
    """δ(ε) of N(mu0, sd0²) against N(mu1, sd1²), the larger of the two directions."""
    if sd0 <= 0 or sd1 <= 0:
        raise ValueError(f"standard deviations must be > 0, got {sd0}, {sd1}")
    return max(_delta_one_way(eps, mu1, sd1, mu0, sd0), _delta_one_way(eps, mu0, sd0, mu1, sd1))


def gaussian_pair_epsilon(delta: float, mu0: float, sd0: float, mu1: float, sd1: float) -> float:
    """The smallest ε with δ(ε) ≤ ``delta`` for the two Gaussians (bisection; δ(ε) falls with ε).
    Equal variances give the Gaussian mechanism of sensitivity |mu1 − mu0| and noise sd."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if gaussian_pair_delta(0.0, mu0, sd0, mu1, sd1) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_pair_delta(hi, mu0, sd0, mu1, sd1) > delta:
        lo, hi = hi, 2 * hi
        if hi > _EPS_MAX:
            return math.inf
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if gaussian_pair_delta(mid, mu0, sd0, mu1, sd1) <= delta else (mid, hi)
    return hi


@dataclass(frozen=True)
class CanaryEstimate:
    """An empirical ε with its bootstrap interval.

    ``epsilon``: the point estimate; ``low``/``high``: the two-sided percentile interval at
    ``confidence``; ``lower_bound``: the one-sided lower bound at ``confidence``; ``null`` and
    ``alternative``: the fitted (mean, std) of held-out and inserted cosines.
    """

    epsilon: float
    low: float
    high: float
    lower_bound: float
    confidence: float
    delta: float
    null: tuple[float, float]
    alternative: tuple[float, float]
    inserted: int
    held_out: int


def _fit(values: np.ndarray) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1))


def _separation(inserted: np.ndarray, held_out: np.ndarray) -> float:
    """(mean_in − mean_out) / pooled std: the Gaussian mechanism's μ the cosines show."""
    n1, n0 = inserted.size, held_out.size
    pooled = ((n1 - 1) * np.var(inserted, ddof=1) + (n0 - 1) * np.var(held_out, ddof=1)) / (n1 + n0 - 2)
    return float((np.mean(inserted) - np.mean(held_out)) / math.sqrt(pooled))


def gaussian_mechanism_epsilon(delta: float, separation: float) -> float:
    """ε at δ of the Gaussian mechanism with sensitivity/noise = ``separation`` (0 when ≤ 0)."""
    return 0.0 if separation <= 0 else gaussian_pair_epsilon(delta, 0.0, 1.0, separation, 1.0)


def estimate_epsilon(inserted: np.ndarray, held_out: np.ndarray, *, delta: float, confidence: float = 0.95,
                     bootstrap: int = 1000, seed: int = 0, equal_variance: bool = True) -> CanaryEstimate:
    """Andrew et al.'s estimate from the cosines of inserted and held-out canaries.

    Parameters
    ----------
    inserted, held_out:
        Cosines with the final model delta of the inserted canaries and of canaries never
        inserted (at least 10 each).
    delta:
        δ of the reported ε.
    confidence:
        Level of the bootstrap interval and of the lower bound.
    bootstrap:
        Bootstrap resamples (0: no interval; ``low``/``high``/``lower_bound`` are then the estimate).
    seed:
        Seed of the resampling (the estimate itself is deterministic).
    equal_variance:
        True: the Gaussian mechanism of the pooled separation (default); False: the two fitted
        Gaussians with their own spreads.
    """
    inserted, held_out = np.asarray(inserted, dtype=np.float64), np.asarray(held_out, dtype=np.float64)
    if inserted.size < 10 or held_out.size < 10:
        raise ValueError("need at least 10 inserted and 10 held-out canaries")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    null, alt = _fit(held_out), _fit(inserted)

    def epsilon_of(ins: np.ndarray, out: np.ndarray) -> float:
        if equal_variance:
            return gaussian_mechanism_epsilon(delta, _separation(ins, out))
        return gaussian_pair_epsilon(delta, *_fit(out), *_fit(ins))

    point = epsilon_of(inserted, held_out)
    if bootstrap <= 0:
        return CanaryEstimate(point, point, point, point, confidence, delta, null, alt, inserted.size, held_out.size)
    rng = np.random.default_rng(seed)
    tail = 1.0 - confidence
    levels = [tail / 2, 1 - tail / 2, tail]
    resamples = [(rng.choice(inserted, inserted.size), rng.choice(held_out, held_out.size)) for _ in range(bootstrap)]
    if equal_variance:  # ε grows with the separation: its quantiles are ε of the separation's
        separations = np.quantile([_separation(i, o) for i, o in resamples], levels)
        low, high, lower = (gaussian_mechanism_epsilon(delta, float(x)) for x in separations)
    else:
        low, high, lower = np.quantile([epsilon_of(i, o) for i, o in resamples], levels)
    return CanaryEstimate(point, float(low), float(high), float(lower), confidence, delta, null, alt,
                          inserted.size, held_out.size)
