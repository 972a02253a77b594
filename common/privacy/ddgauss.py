"""Privacy of the distributed discrete Gaussian (DDGauss) as pure functions.

Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", ICML 2021 (arXiv 2102.06387, v4), referred to as [KLS21]:

* **Rounding** (Theorem 1 / Proposition 22 of [KLS21]). A vector of L2 norm ≤ ``c`` (already
  scaled to the integer grid) rounded coordinate-wise at random to ``Z^d`` and resampled until
  its squared norm is at most

      Δ₂² = min{ c² + d/4 + √(2·ln(1/β))·(c + √d/2),  (c + √d)² }

  keeps norm ≤ Δ₂ (a resample is accepted with probability ≥ 1 − β); β = 0 means plain
  randomized rounding and the deterministic bound ``c + √d``. On ``Z^d``, ‖x‖₁ ≤ min(√d·Δ₂, Δ₂²).
* **Sum of n discrete Gaussians** (Theorem 1 and Proposition 14, Eq. 17, of [KLS21]). Each of
  ``n`` clients adds N_Z(0, σ²) per coordinate (σ ≥ 1/2, in grid units). With

      τ = 10 · Σ_{k=1}^{n−1} exp(−2π²σ²·k/(k+1)),

  changing one client's input by Δ (‖Δ‖₂ ≤ Δ₂, ‖Δ‖₁ ≤ Δ₁) moves the Rényi divergence of the
  noisy sum by at most (Eq. 17)

      D_α ≤ min{ α·Δ₂²/(2nσ²) + τ·d,
                 α/2 · (Δ₂²/(nσ²) + 2·τ·Δ₁/(√n·σ) + τ²·d),
                 α/2 · (Δ₂/(√n·σ) + τ·√d)² }            for every α > 1.

  With τ → 0 and Δ₂ → c this is the Gaussian mechanism's α·c²/(2nσ²): the central bound.
* **Poisson subsampling** at rate q (Zhu and Wang, "Poisson Subsampled Rényi Differential
  Privacy", ICML 2019, Theorem 5, the general upper bound for any mechanism, integer α ≥ 2):

      ε'(α) ≤ 1/(α−1) · log{ (1−q)^{α−1}(αq − q + 1) + C(α,2)·q²(1−q)^{α−2}·e^{ε(2)}
                             + 3·Σ_{l=3}^{α} C(α,l)·q^l(1−q)^{α−l}·e^{(l−1)ε(l)} },

  taken as min(ε'(α), ε(α)) (amplification never costs). At a fractional order the value at the
  next integer order is used: Rényi divergence does not decrease with the order.

The neighbouring relation is [KLS21]'s: one client's vector is replaced by zero while the
number of noise shares stays n ("zero-out"; see docs/DISTRIBUTED_DP.md). Nothing here keeps
state; the ledger composes the curves (``common.privacy.analysis``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

#: β of conditional rounding used by the paper's experiments and TFF's ``ddp_secure_aggregator``:
#: a rounded vector is accepted with probability ≥ 1 − e^{−1/2} ≈ 0.39 (≤ 2.6 draws expected).
DEFAULT_BETA: float = math.exp(-0.5)


def rounded_l2_bound(norm: float, dim: int, beta: float) -> float:
    """Δ₂: the L2 norm a vector of norm ≤ ``norm`` (grid units) keeps after conditional
    randomized rounding in ``dim`` coordinates ([KLS21] Theorem 1 / Proposition 22).

    Parameters
    ----------
    norm:
        Bound on the norm before rounding, in grid units (clip / γ), ≥ 0.
    dim:
        Number of coordinates rounded (the padded dimension), ≥ 1.
    beta:
        0 ≤ β < 1; 0 is plain randomized rounding (bound ``norm + √dim``).
    """
    if not (norm >= 0 and math.isfinite(norm)) or dim < 1 or not 0.0 <= beta < 1.0:
        raise ValueError(f"need norm >= 0, dim >= 1 and 0 <= beta < 1; got {norm}, {dim}, {beta}")
    plain = norm + math.sqrt(dim)
    if beta == 0.0:
        return plain
    conditional = norm**2 + dim / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (norm + math.sqrt(dim) / 2.0)
    return min(plain, math.sqrt(conditional))


def rounded_l1_bound(l2_bound: float, dim: int) -> float:
    """Δ₁ of an integer vector of L2 norm ≤ ``l2_bound`` in ``dim`` coordinates:
    ‖x‖₁ ≤ √d·‖x‖₂ always, and ‖x‖₁ ≤ ‖x‖₂² when every coordinate is an integer."""
    return l2_bound * min(math.sqrt(dim), l2_bound)


def tau(local_variance: float, clients: int) -> float:
    """τ of [KLS21] Theorem 1: how far the sum of ``clients`` discrete Gaussians of variance
    parameter σ² = ``local_variance`` (grid units) is from one discrete Gaussian of nσ²."""
    if clients < 1 or local_variance <= 0:
        raise ValueError(f"need clients >= 1 and local_variance > 0, got {clients}, {local_variance}")
    k = np.arange(1, clients, dtype=np.float64)
    return float(10.0 * np.sum(np.exp(-2.0 * math.pi**2 * local_variance * k / (k + 1.0))))


def ddgauss_rdp(orders: np.ndarray, *, l2: float, l1: float, tau_: float, dim: int, clients: int,
                local_variance: float) -> np.ndarray:
    """[KLS21] Proposition 14 / Eq. 17: RDP of one noisy sum at each order α > 1 (unsampled)."""
    alpha = np.asarray(orders, dtype=np.float64)
    if np.any(alpha <= 1.0):
        raise ValueError("Rényi orders must be > 1")
    total_std = math.sqrt(clients * local_variance)
    l2_scale, l1_scale = l2 / total_std, l1 / total_std
    term_1 = alpha * l2_scale**2 / 2.0 + tau_ * dim
    term_2 = alpha / 2.0 * (l2_scale**2 + 2.0 * l1_scale * tau_ + tau_**2 * dim)
    term_3 = alpha / 2.0 * (l2_scale + math.sqrt(dim) * tau_) ** 2
    return np.minimum(np.minimum(term_1, term_2), term_3)


def _log_binom(n: int, k: np.ndarray) -> np.ndarray:
    from scipy.special import gammaln

    return gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)


def poisson_subsampled_rdp(base: np.ndarray, sample_rate: float) -> np.ndarray:
    """Zhu & Wang (2019) Theorem 5 at the integer orders 2, 3, …, len(base)+1.

    Parameters
    ----------
    base:
        ``base[i]`` is the unsampled mechanism's RDP at order ``i + 2`` (non-decreasing).
    sample_rate:
        Poisson rate q with 0 < q ≤ 1 (q = 1 returns ``base``).

    Returns
    -------
    numpy.ndarray
        min(subsampled bound, unsampled RDP) at each of those orders.
    """
    from scipy.special import logsumexp

    base = np.asarray(base, dtype=np.float64)
    q = float(sample_rate)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {q}")
    if q == 1.0:
        return base.copy()
    log_q, log_1q = math.log(q), math.log1p(-q)
    out = np.empty_like(base)
    for i in range(len(base)):
        alpha = i + 2
        terms = [(alpha - 1) * log_1q + math.log(alpha * q - q + 1.0),
                 float(_log_binom(alpha, np.array(2.0))) + 2 * log_q + (alpha - 2) * log_1q + base[0]]
        if alpha >= 3:
            ls = np.arange(3, alpha + 1, dtype=np.float64)
            terms.extend(math.log(3.0) + _log_binom(alpha, ls) + ls * log_q + (alpha - ls) * log_1q
                         + (ls - 1.0) * base[ls.astype(int) - 2])
        out[i] = min(float(logsumexp(terms)) / (alpha - 1), base[i])
    return out


@functools.lru_cache(maxsize=512)
def rdp_curve(orders: tuple[float, ...], *, l2: float, l1: float, tau_: float, dim: int, clients: int,
              local_variance: float, sample_rate: float) -> np.ndarray:
    """RDP of one DDGauss release at each of ``orders`` (read-only array), sampled at rate q.

    Fractional orders take the subsampled value of the next integer order (RDP is
    non-decreasing in α), capped by the unsampled value at the order itself.
    """
    orders_arr = np.asarray(orders, dtype=np.float64)
    params = {"l2": l2, "l1": l1, "tau_": tau_, "dim": dim, "clients": clients, "local_variance": local_variance}
    unsampled = ddgauss_rdp(orders_arr, **params)
    if sample_rate < 1.0:
        top = int(math.ceil(orders_arr.max()))
        sampled = poisson_subsampled_rdp(ddgauss_rdp(np.arange(2, top + 1), **params), sample_rate)
        at_ceiling = sampled[np.ceil(orders_arr).astype(int) - 2]
        unsampled = np.minimum(unsampled, at_ceiling)
    unsampled.setflags(write=False)
    return unsampled


def epsilon_from_rdp(orders: Sequence[float], rdp: np.ndarray, delta: float) -> float:
    """ε at ``delta`` by dp-accounting's RDP conversion (Canonne–Kamath–Steinke 2020, Prop. 12)."""
    from dp_accounting.rdp import compute_epsilon

    if not np.any(rdp):
        return 0.0
    return float(compute_epsilon(list(orders), list(rdp), delta)[0])
