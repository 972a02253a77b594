"""Pure privacy math on ``(noise_multiplier, sample_rate, steps)`` releases.

Nothing here keeps state between calls (apart from bounded memo caches of pure results):
the ledger owns the history, this module only turns a sequence of releases into ε, the way
``opacus/accountants/analysis/rdp.py`` sits apart from Opacus' accountant. Google's
``dp_accounting`` does the mathematics; it is imported lazily because importing it takes
over a second (scipy), which an edge client that only records events should not pay.

Every release is a Poisson-sampled Gaussian mechanism composed ``steps`` times under one
neighbouring relation; ``sample_rate == 1.0`` means no sampling (a plain Gaussian, composed
exactly as one Gaussian of noise ``σ / sqrt(steps)``). σ is always the noise std over the
norm bound C of one unit's contribution, so under ``replace-one`` two contributions differ by
up to 2C: dp-accounting's PLD models that pair exactly
((1−q)·N(0, σ²) + q·N(−1, σ²) against (1−q)·N(0, σ²) + q·N(1, σ²)); its RDP accountant has no
Poisson ``replace-one`` support, so :func:`_replace_one_rdp` integrates the same pair's Rényi
divergence numerically (checked against closed forms in tests/test_privacy_ledger.py).

A :class:`DdgRelease` is one sum of distributed discrete Gaussians (distributed DP): its RDP curve
is Kairouz–Liu–Steinke's bound amplified by Zhu–Wang's (:mod:`common.privacy.ddgauss`); it
composes with Gaussian releases under RDP, and has no privacy-loss distribution (PLD refuses it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from dp_accounting import DpEvent
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

#: RDP orders: Opacus' default (fractional orders near 1 give tighter ε for long runs).
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(order) for order in range(12, 64)]
)

#: PLD grid step. 1e-3 composes 2000 steps in ~0.05 s and differs from 1e-4 by ~0.01%;
#: the estimate is pessimistic (an upper bound) at any grid step.
PLD_VALUE_DISCRETIZATION_INTERVAL: float = 1e-3

_ABSL_NOT_CONVERGED = "_compute_log_a_frac failed to converge"


#: Neighbouring relations the analysis understands (the values of ``ledger.Relation``).
ADD_OR_REMOVE = "add-or-remove-one"
REPLACE_ONE = "replace-one"


class Release(NamedTuple):
    """``steps`` compositions of one Poisson-sampled Gaussian mechanism under ``relation``."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    relation: str = ADD_OR_REMOVE


class DdgRelease(NamedTuple):
    """``steps`` compositions of one distributed discrete Gaussian sum (:mod:`common.privacy.ddgauss`):
    Δ₂, Δ₁ and τ in grid units, the padded dimension, the number of noise shares and their
    variance, Poisson-sampled at ``sample_rate`` (1.0: no amplification)."""

    l2: float
    l1: float
    tau: float
    dim: int
    clients: int
    local_variance: float
    sample_rate: float
    steps: int
    relation: str = ADD_OR_REMOVE
    #: Total-variation distance of one step's noise, as sampled, from the ideal discrete Gaussians
    #: (every draw of every share): added to δ by :meth:`RdpComposition.epsilon`.
    sampler_slack: float = 0.0


AnyRelease = Release | DdgRelease


def _as_release(release: Any) -> AnyRelease:
    return release if isinstance(release, DdgRelease) else Release(*release)


def merge_consecutive(releases: Iterable[AnyRelease]) -> list[AnyRelease]:
    """Merge neighbouring releases equal in everything but ``steps`` into one with the summed steps.

    Composition is order-free, so this changes no ε; it lets a PLD self-compose a run of
    identical rounds by repeated squaring instead of convolving them one by one.
    """
    merged: list[AnyRelease] = []
    for release in releases:
        release = _as_release(release)
        last = merged[-1] if merged else None
        if (last is not None and type(last) is type(release)
                and last._replace(steps=0) == release._replace(steps=0)):
            merged[-1] = last._replace(steps=last.steps + release.steps)
        else:
            merged.append(release)
    return merged


def to_dp_event(release: Release) -> DpEvent:
    """The ``dp_accounting`` event of one release (``q == 1``: an unsampled Gaussian); the
    relation is the accountant's, not the event's (see :func:`_neighbor_rel`)."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(release.noise_multiplier)
    once = (
        gaussian
        if release.sample_rate == 1.0
        else dp_accounting.PoissonSampledDpEvent(release.sample_rate, gaussian)
    )
    return dp_accounting.SelfComposedDpEvent(once, release.steps)


def rdp_epsilon(releases: Sequence[AnyRelease], delta: float) -> float:
    """ε at ``delta`` of all releases composed, by ``dp_accounting.rdp.RdpAccountant``.

    Parameters
    ----------
    releases:
        The releases in order; an empty sequence costs nothing (ε = 0).
    delta:
        Target δ in (0, 1).

    Returns
    -------
    float
        The smallest ε over :data:`RDP_ORDERS` (orders whose fractional series does not
        converge are excluded by ``dp_accounting``, which can only raise ε).
    """
    if not releases:
        return 0.0
    composition = RdpComposition()
    for release in merge_consecutive(releases):
        composition = composition.then(release)
    return composition.epsilon(delta)


def pld_epsilon(releases: Sequence[AnyRelease], delta: float) -> float:
    """ε at ``delta`` of all releases composed, by ``dp_accounting.pld.PLDAccountant``.

    Parameters
    ----------
    releases:
        The releases in order; equal consecutive ``(σ, q)`` are merged and self-composed.
    delta:
        Target δ in (0, 1).

    Returns
    -------
    float
        A pessimistic (upper-bound) ε on a grid of :data:`PLD_VALUE_DISCRETIZATION_INTERVAL`.
    """
    if not releases:
        return 0.0
    composition = PldComposition()
    for release in merge_consecutive(releases):
        composition = composition.then(release)
    return composition.epsilon(delta)


@dataclass(frozen=True)
class RdpComposition:
    """Running RDP curve of the releases composed so far (immutable; ``then`` adds one).

    RDP composes by adding curves, so extending a long history costs one vector addition;
    the per-step curve of each ``(σ, q)`` is computed once and memoised.
    """

    rdp: tuple[float, ...] = (0.0,) * len(RDP_ORDERS)
    #: Σ of the releases' ``sampler_slack``: how far, in total variation, the noise that ran can be
    #: from the noise the curve is for.
    slack: float = 0.0

    def then(self, release: AnyRelease) -> RdpComposition:
        """The composition followed by ``release``."""
        release = _as_release(release)
        if isinstance(release, DdgRelease):
            unit = _ddg_unit_rdp(release)
            slack = self.slack + release.steps * release.sampler_slack
        else:
            unit = _unit_rdp(release.noise_multiplier, release.sample_rate, release.relation)
            slack = self.slack
        return RdpComposition(tuple(np.asarray(self.rdp) + release.steps * unit), slack)

    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` (0 for the empty composition).

        With a sampler slack η > 0 (noise within η in total variation of the ideal), the ideal
        mechanism's (ε, δ′) makes the one that ran (ε, δ′ + (1 + e^ε)·η)-DP; ε is taken at
        δ′ = δ − (1 + e^{ε(δ/2)})·η, which is ≥ δ/2, so ε(δ′) ≤ ε(δ/2) and the sum stays ≤ δ.
        When (1 + e^{ε(δ/2)})·η exceeds δ/2 (ε in the hundreds: no guarantee worth the name) no finite
        ε is proven and the answer is ∞."""
        from dp_accounting.rdp import compute_epsilon

        if not any(self.rdp):
            return 0.0
        if self.slack > 0:
            upper = float(compute_epsilon(RDP_ORDERS, self.rdp, delta / 2)[0])
            spent = (1.0 + math.exp(min(upper, 700.0))) * self.slack
            if not spent <= delta / 2:
                return math.inf
            delta = math.nextafter(delta - spent, 0.0)  # strictly below δ − spent, also in floats
        return float(compute_epsilon(RDP_ORDERS, self.rdp, delta)[0])


@dataclass(frozen=True)
class PldComposition:
    """Running privacy-loss distribution of the releases composed so far (immutable).

    ``then`` convolves once with the release's distribution, which matches the
    accountant's self-composition of merged releases to ~1e-9 relative.
    """

    pld: Any = None  # PrivacyLossDistribution; None is the identity (nothing released).

    def then(self, release: AnyRelease) -> PldComposition:
        """The composition followed by ``release`` (Gaussian releases only: dp-accounting has no
        privacy-loss distribution for a sum of discrete Gaussians, so DDGauss is RDP-only)."""
        if isinstance(release, DdgRelease):
            raise ValueError("distributed discrete Gaussian releases are accounted by RDP only "
                             "([KLS21] Proposition 14); ask for Accountant.RDP")
        step = _release_pld(*Release(*release))
        return PldComposition(step if self.pld is None else self.pld.compose(step))

    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` (0 for the empty composition)."""
        if self.pld is None:
            return 0.0
        return float(self.pld.get_epsilon_for_delta(delta))


def _neighbor_rel(relation: str):
    from dp_accounting import NeighboringRelation

    if relation == ADD_OR_REMOVE:
        return NeighboringRelation.ADD_OR_REMOVE_ONE
    if relation == REPLACE_ONE:
        return NeighboringRelation.REPLACE_ONE
    raise ValueError(f"unknown neighbouring relation {relation!r}; expected {ADD_OR_REMOVE!r} or {REPLACE_ONE!r}.")


def _ddg_unit_rdp(release: DdgRelease) -> np.ndarray:
    """RDP curve of one DDGauss step on :data:`RDP_ORDERS` (add/remove "zero-out" only: the
    Zhu–Wang amplification bound it uses is for adding or removing one unit)."""
    from common.privacy import ddgauss

    if release.relation != ADD_OR_REMOVE:
        raise ValueError(f"distributed discrete Gaussian releases are accounted under {ADD_OR_REMOVE!r} "
                         f"only, not {release.relation!r}")
    return ddgauss.rdp_curve(RDP_ORDERS, l2=release.l2, l1=release.l1, tau_=release.tau, dim=release.dim,
                             clients=release.clients, local_variance=release.local_variance,
                             sample_rate=release.sample_rate)


@functools.lru_cache(maxsize=256)
def _unit_rdp(noise_multiplier: float, sample_rate: float, relation: str = ADD_OR_REMOVE) -> np.ndarray:
    """RDP curve of one step (read-only array).

    add/remove: read back from a fresh ``dp_accounting`` ``RdpAccountant``. replace-one without
    sampling: the Gaussian with twice the sensitivity (σ/2), again by dp_accounting. replace-one
    with Poisson sampling: :func:`_replace_one_rdp`.
    """
    from dp_accounting import rdp

    _neighbor_rel(relation)  # refuses an unknown relation
    if relation == REPLACE_ONE and sample_rate < 1.0:
        curve = _replace_one_rdp(noise_multiplier, sample_rate)
    else:
        sigma = noise_multiplier / 2.0 if relation == REPLACE_ONE else noise_multiplier
        accountant = rdp.RdpAccountant(list(RDP_ORDERS))
        with _quiet_dp_accounting():
            accountant.compose(to_dp_event(Release(sigma, sample_rate, 1)))
        curve = np.array(accountant.rdp, dtype=np.float64)
    if sample_rate < 1.0:
        # Subsampling is post-processing of the full step, so the full step's RDP bounds it too.
        # dp_accounting's sampled-Gaussian series can land a hair above it at some orders when σ
        # is large (σ=12, q=0.5: ε 16.5233 against 16.5219 without amplification, found by
        # tests/test_privacy_ledger.py's property test): take the smaller bound at every order.
        curve = np.minimum(curve, _unit_rdp(noise_multiplier, 1.0, relation))
    curve.setflags(write=False)
    return curve


#: Grid of :func:`_mixture_rdp`: points per σ, and how many σ beyond the mass it reaches.
_GRID_PER_SIGMA = 64
_TAIL_SIGMAS = 40.0


def _replace_one_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP at every order of :data:`RDP_ORDERS` of one Poisson-subsampled Gaussian step under
    replace-one (noise σ, contributions of norm ≤ 1): D_α(P‖Q) for the pair

        P = (1−q)·N(0, σ²) + q·N(−1, σ²),   Q = (1−q)·N(0, σ²) + q·N(+1, σ²),

    the pair dp-accounting's PLD uses for ``REPLACE_ONE`` (the two contributions opposite each
    other; the pair is symmetric, so D_α(P‖Q) = D_α(Q‖P))."""
    q = float(sample_rate)
    return _mixture_rdp(float(noise_multiplier), (q, -1.0), (q, 1.0))


def _mixture_rdp(sigma: float, p: tuple[float, float], q: tuple[float, float]) -> np.ndarray:
    """D_α(P‖Q) at every order of :data:`RDP_ORDERS` for one-dimensional Gaussian mixtures
    P = (1−w_p)·N(0, σ²) + w_p·N(m_p, σ²) and Q likewise, with ``p = (w_p, m_p)``, ``q = (w_q, m_q)``.

    ``∫ P^α Q^{1−α}`` is integrated in log space (trapezoid, exact to many digits for these
    smooth, fast-decaying integrands) on a grid of σ/64 covering where the integrand lives:
    between ``(1−α)·m_q + α·m_p``-ish peaks, with 40 σ to spare on both sides.
    """
    from scipy.special import logsumexp

    def log_mixture(x: np.ndarray, weight: float, mean: float) -> np.ndarray:
        base = -0.5 * (x / sigma) ** 2
        if weight <= 0.0:
            return base
        if weight >= 1.0:
            return -0.5 * ((x - mean) / sigma) ** 2
        return np.logaddexp(math.log1p(-weight) + base, math.log(weight) - 0.5 * ((x - mean) / sigma) ** 2)

    means = [0.0, p[1], q[1]]
    out = np.empty(len(RDP_ORDERS))
    log_norm = -0.5 * math.log(2 * math.pi) - math.log(sigma)
    for k, alpha in enumerate(RDP_ORDERS):
        # Peaks of α·log P + (1−α)·log Q between component means lie within α·span of them.
        span = max(means) - min(means)
        lo = min(means) - alpha * span - _TAIL_SIGMAS * sigma
        hi = max(means) + alpha * span + _TAIL_SIGMAS * sigma
        n = int(math.ceil((hi - lo) / sigma * _GRID_PER_SIGMA)) + 1
        x, dx = np.linspace(lo, hi, n, retstep=True)
        log_integrand = alpha * log_mixture(x, *p) + (1.0 - alpha) * log_mixture(x, *q) + log_norm
        log_integral = float(logsumexp(log_integrand)) + math.log(dx)
        out[k] = max(log_integral / (alpha - 1.0), 0.0)
    return out


@functools.lru_cache(maxsize=64)
def _release_pld(
    noise_multiplier: float, sample_rate: float, steps: int, relation: str = ADD_OR_REMOVE
) -> PrivacyLossDistribution:
    """The distribution of one release, built exactly as ``PLDAccountant`` builds it."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    rel = _neighbor_rel(relation)
    if sample_rate == 1.0:
        return pld.from_gaussian_mechanism(
            standard_deviation=noise_multiplier / math.sqrt(steps),
            value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL,
            neighboring_relation=rel,
        )
    return pld.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL,
        sampling_prob=sample_rate,
        neighboring_relation=rel,
    ).self_compose(steps)


class _DropNotConverged(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ABSL_NOT_CONVERGED)


@contextlib.contextmanager
def _quiet_dp_accounting() -> Iterator[None]:
    """Silence ``dp_accounting``'s warning that it drops a non-converging fractional order.

    Dropping an order can only raise ε (it is removed from the minimum), so the warning
    is noise at large q; with a plan's binary search it would print hundreds of times.
    """
    absl_logger = logging.getLogger("absl")
    drop = _DropNotConverged()
    absl_logger.addFilter(drop)
    try:
        yield
    finally:
        absl_logger.removeFilter(drop)
