"""Pure privacy math on ``(noise_multiplier, sample_rate, steps)`` releases.

Nothing here keeps state between calls (apart from bounded memo caches of pure results):
the ledger owns the history, this module only turns a sequence of releases into ε, the way
``opacus/accountants/analysis/rdp.py`` sits apart from Opacus' accountant. Google's
``dp_accounting`` does the mathematics; it is imported lazily because importing it takes
over a second (scipy), which an edge client that only records events should not pay.

Every release is a Poisson-sampled Gaussian mechanism composed ``steps`` times under the
add/remove-one relation; ``sample_rate == 1.0`` means no sampling (a plain Gaussian,
composed exactly as one Gaussian of noise ``σ / sqrt(steps)``).
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


class Release(NamedTuple):
    """``steps`` compositions of one Poisson-sampled Gaussian mechanism."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def merge_consecutive(releases: Iterable[Release]) -> list[Release]:
    """Merge neighbouring releases with equal ``(σ, q)`` into one with the summed steps.

    Composition is order-free, so this changes no ε; it lets a PLD self-compose a run of
    identical rounds by repeated squaring instead of convolving them one by one.
    """
    merged: list[Release] = []
    for release in releases:
        if merged and merged[-1][:2] == release[:2]:
            merged[-1] = merged[-1]._replace(steps=merged[-1].steps + release.steps)
        else:
            merged.append(Release(*release))
    return merged


def to_dp_event(release: Release) -> DpEvent:
    """The ``dp_accounting`` event of one release (``q == 1``: an unsampled Gaussian)."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(release.noise_multiplier)
    once = (
        gaussian
        if release.sample_rate == 1.0
        else dp_accounting.PoissonSampledDpEvent(release.sample_rate, gaussian)
    )
    return dp_accounting.SelfComposedDpEvent(once, release.steps)


def rdp_epsilon(releases: Sequence[Release], delta: float) -> float:
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
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(list(RDP_ORDERS))
    events = [to_dp_event(release) for release in merge_consecutive(releases)]
    with _quiet_dp_accounting():
        accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def pld_epsilon(releases: Sequence[Release], delta: float) -> float:
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
    import dp_accounting
    from dp_accounting import pld

    accountant = pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL)
    events = [to_dp_event(release) for release in merge_consecutive(releases)]
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class RdpComposition:
    """Running RDP curve of the releases composed so far (immutable; ``then`` adds one).

    RDP composes by adding curves, so extending a long history costs one vector addition;
    the per-step curve of each ``(σ, q)`` is computed once and memoised.
    """

    rdp: tuple[float, ...] = (0.0,) * len(RDP_ORDERS)

    def then(self, release: Release) -> RdpComposition:
        """The composition followed by ``release``."""
        unit = _unit_rdp(release.noise_multiplier, release.sample_rate)
        return RdpComposition(tuple(np.asarray(self.rdp) + release.steps * unit))

    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` (0 for the empty composition)."""
        from dp_accounting.rdp import compute_epsilon

        if not any(self.rdp):
            return 0.0
        return float(compute_epsilon(RDP_ORDERS, self.rdp, delta)[0])


@dataclass(frozen=True)
class PldComposition:
    """Running privacy-loss distribution of the releases composed so far (immutable).

    ``then`` convolves once with the release's distribution, which matches the
    accountant's self-composition of merged releases to ~1e-9 relative.
    """

    pld: Any = None  # PrivacyLossDistribution; None is the identity (nothing released).

    def then(self, release: Release) -> PldComposition:
        """The composition followed by ``release``."""
        step = _release_pld(*release)
        return PldComposition(step if self.pld is None else self.pld.compose(step))

    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` (0 for the empty composition)."""
        if self.pld is None:
            return 0.0
        return float(self.pld.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=256)
def _unit_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP curve of one step, read back from a fresh ``RdpAccountant`` (read-only array)."""
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(list(RDP_ORDERS))
    with _quiet_dp_accounting():
        accountant.compose(to_dp_event(Release(noise_multiplier, sample_rate, 1)))
    curve: np.ndarray = np.array(accountant.rdp, dtype=np.float64)
    curve.setflags(write=False)
    return curve


@functools.lru_cache(maxsize=64)
def _release_pld(
    noise_multiplier: float, sample_rate: float, steps: int
) -> PrivacyLossDistribution:
    """The distribution of one release, built exactly as ``PLDAccountant`` builds it."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    if sample_rate == 1.0:
        return pld.from_gaussian_mechanism(
            standard_deviation=noise_multiplier / math.sqrt(steps),
            value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL,
        )
    return pld.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL,
        sampling_prob=sample_rate,
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
