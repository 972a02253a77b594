"""Plan a distributed-DP run: each device's noise, the grid step γ and the ε they give.

Given the budget (ε, δ, rounds, q), the SecAgg+ field (bits), the fewest survivors a released
round may have (n_min), the largest cohort the field must hold (n_max), the clip C and the
dimension d, :func:`plan_distributed` returns the finest grid γ for which

* each device's integer noise variance σ² (grid units) is the smallest that keeps the [KLS21]
  bound with n_min noise shares, composed over the rounds, within the target ε; and
* the noisy sum of n_max devices leaves [−M/2, M/2) with probability at most ``wrap_probability``
  per round (:func:`common.secure_sum.noisy_sum_wrap_bound`).

A finer grid wastes less of the clip on rounding (Δ₂ → C/γ) but needs more of the field, so the
smallest feasible γ is the best one. Two ε come with each plan: against anyone who sees only the
released models (amplified by secret Poisson sampling) and against the server, which knows the
cohort (no amplification; only the survivors' noise protects a user).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.privacy import ddgauss
from common.privacy._validate import require_delta, require_int, require_positive, require_sample_rate
from common.privacy.analysis import DdgRelease, rdp_epsilon
from common.privacy.ddp_event import DistributedDpEvent
from common.privacy.discrete_gaussian_table import table_distance
from common.privacy.distributed import DistributedDpParams, padded_dim
from common.privacy.ledger import Relation, Sampling
from common.secure_sum import check_server_sum, noisy_sum_wrap_bound

#: Default bound on the probability that one round's noisy sum wraps around the field.
DEFAULT_WRAP_PROBABILITY = 1e-9
_SEARCH_STEPS = 60


@dataclass(frozen=True)
class DistributedPlan:
    """One planned configuration (see :func:`plan_distributed` for the fields' meaning)."""

    modulus_bits: int
    gamma: float
    local_variance: int
    clip: float
    dim: int
    min_survivors: int
    max_cohort: int
    beta: float
    sample_rate: float
    rounds: int
    delta: float
    #: ε against whoever sees only the released models (Poisson amplification at rate q).
    epsilon: float
    #: ε against the server (it knows the cohort): no amplification, n_min noise shares.
    epsilon_server: float
    #: Bound on P(the noisy sum of max_cohort devices wraps) in one round.
    wrap_probability: float

    @property
    def padded_dim(self) -> int:
        return padded_dim(self.dim)

    @property
    def local_std(self) -> float:
        """Each device's noise std per coordinate, in update units (γ·σ)."""
        return self.gamma * math.sqrt(self.local_variance)

    @property
    def norm_inflation(self) -> float:
        """Δ₂·γ/C: how much conditional rounding inflates the sensitivity (→ 1 with more bits)."""
        return ddgauss.rounded_l2_bound(self.clip / self.gamma, self.padded_dim, self.beta) * self.gamma / self.clip

    @property
    def noise_multiplier(self) -> float:
        """γ·√(n_min·σ²)/C: the central noise multiplier that n_min devices' noise amounts to."""
        return self.local_std * math.sqrt(self.min_survivors) / self.clip

    def params(self) -> DistributedDpParams:
        """The parameters every device and the server run with."""
        return DistributedDpParams(clip=self.clip, gamma=self.gamma, local_variance=self.local_variance,
                                   dim=self.dim, modulus_bits=self.modulus_bits, min_survivors=self.min_survivors,
                                   max_survivors=self.max_cohort, beta=self.beta)

    def event(self, *, server_round: int, parameters: tuple[str, ...], survivors: int | None = None,
              sampling: Sampling = Sampling.POISSON) -> DistributedDpEvent:
        """The ledger event of one released round (accounted with ``survivors`` noise shares,
        n_min by default; never more than the round really summed)."""
        shares = self.min_survivors if survivors is None else survivors
        return DistributedDpEvent(clip=self.clip, gamma=self.gamma, local_variance=self.local_variance,
                                  survivors=shares, max_survivors=max(self.max_cohort, shares), dim=self.padded_dim,
                                  beta=self.beta, sample_rate=self.sample_rate, sampling=sampling,
                                  parameters=parameters, round=server_round,
                                  sampler_distance=table_distance(self.local_variance))


def ddp_epsilon(*, clip: float, gamma: float, local_variance: int, survivors: int, dim: int, beta: float,
                sample_rate: float, rounds: int, delta: float, max_survivors: int | None = None) -> float:
    """ε (RDP) of ``rounds`` DDGauss releases, as a ledger of their events reports it (less the
    table sampler's slack, which moves ε by ~1e-96 and no printed digit);
    ``sample_rate`` 1.0 claims no amplification. ``dim`` is the unpadded dimension; τ is taken at
    ``max_survivors`` (``survivors`` when ``None``)."""
    event = DistributedDpEvent(clip=clip, gamma=gamma, local_variance=local_variance, survivors=survivors,
                               max_survivors=survivors if max_survivors is None else max_survivors,
                               dim=padded_dim(dim), beta=beta, sample_rate=sample_rate,
                               sampling=Sampling.POISSON, parameters=("plan",), round=0, steps=rounds)
    return rdp_epsilon([event.release(Relation.ADD_OR_REMOVE_ONE)], delta)


def cohort_bound(population: int, sample_rate: float, probability: float = DEFAULT_WRAP_PROBABILITY) -> int:
    """The smallest m with P(Binomial(population, q) > m) ≤ ``probability``: the cohort size the
    field is sized for under Poisson sampling."""
    from scipy.stats import binom

    require_int("population", population, minimum=1)
    require_sample_rate("sample_rate", sample_rate)
    m = int(min(population, max(0, binom.isf(probability, population, sample_rate))))
    while m < population and binom.sf(m, population, sample_rate) > probability:
        m += 1
    while m > 0 and binom.sf(m - 1, population, sample_rate) <= probability:
        m -= 1
    return max(m, 1)


def _largest_scale(target: float, delta: float, rounds: int, q: float) -> float:
    """Largest Δ₂/(√n·σ) whose Gaussian-like bound (τ = 0), composed, meets ``target``."""
    def eps(x: float) -> float:
        release = DdgRelease(l2=x, l1=x, tau=0.0, dim=1, clients=1, local_variance=1.0, sample_rate=q, steps=rounds)
        return rdp_epsilon([release], delta)

    lo, hi = 1e-6, 1e3
    if eps(lo) > target:
        raise ValueError(f"target_epsilon={target:g} is unreachable: even a negligible signal costs more")
    for _ in range(_SEARCH_STEPS):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if eps(mid) <= target else (lo, mid)
    return lo


def _variance_for(gamma: float, scale: float, *, clip: float, padded: int, beta: float, n_min: int,
                  check) -> int:
    """Smallest integer σ² meeting the budget at grid step γ (τ included, checked by ``check``)."""
    l2 = ddgauss.rounded_l2_bound(clip / gamma, padded, beta)
    variance = max(1, math.ceil(l2**2 / (n_min * scale**2)))
    while not check(gamma, variance):  # τ only matters for tiny σ²
        variance = math.ceil(variance * 1.05) + 1
    return variance


def plan_distributed(*, target_epsilon: float, delta: float, rounds: int, sample_rate: float, modulus_bits: int,
                     min_survivors: int, max_cohort: int, clip: float, dim: int, beta: float = ddgauss.DEFAULT_BETA,
                     wrap_probability: float = DEFAULT_WRAP_PROBABILITY, amplification: bool = True
                     ) -> DistributedPlan:
    """The finest grid γ and smallest integer device variance σ² that meet the target.

    Parameters
    ----------
    target_epsilon, delta, rounds, sample_rate:
        The budget: ε at δ after ``rounds`` releases, Poisson rate q.
    modulus_bits:
        The SecAgg+ field is 2^bits.
    min_survivors:
        n_min: the fewest devices a released round may sum; the noise is sized for them.
    max_cohort:
        n_max: the most devices a round may sum (see :func:`cohort_bound`; larger rounds are
        abandoned); the field is sized for it and τ is taken at it.
    clip, dim:
        C and the flat update's length.
    beta:
        β of conditional rounding.
    wrap_probability:
        Bound on P(wrap) per round at n_max devices.
    amplification:
        True: the target is the released-model ε (amplified); False: the server's ε.

    Raises
    ------
    ValueError
        On invalid arguments, an unreachable target, or too few bits for the field to hold the
        noisy sum of ``max_cohort`` devices (the message names the fewest bits that would).
    """
    require_positive("target_epsilon", target_epsilon)
    require_delta("delta", delta)
    require_int("rounds", rounds, minimum=1)
    require_sample_rate("sample_rate", sample_rate)
    require_int("modulus_bits", modulus_bits, minimum=2)
    require_int("min_survivors", min_survivors, minimum=1)
    require_int("max_cohort", max_cohort, minimum=min_survivors)
    require_positive("clip", clip)
    require_int("dim", dim, minimum=1)
    require_positive("wrap_probability", wrap_probability)
    check_server_sum(max_cohort, 1 << modulus_bits)
    padded = padded_dim(dim)
    q_target = sample_rate if amplification else 1.0
    scale = _largest_scale(target_epsilon, delta, rounds, q_target)

    def epsilon(gamma: float, variance: int, q: float, survivors: int = min_survivors) -> float:
        return ddp_epsilon(clip=clip, gamma=gamma, local_variance=variance, survivors=survivors, dim=dim,
                           beta=beta, sample_rate=q, rounds=rounds, delta=delta,
                           max_survivors=max(max_cohort, survivors))

    def meets(gamma: float, variance: int) -> bool:
        return epsilon(gamma, variance, q_target) <= target_epsilon

    def variance_at(gamma: float) -> int:
        return _variance_for(gamma, scale, clip=clip, padded=padded, beta=beta, n_min=min_survivors, check=meets)

    def wraps(gamma: float, bits: int = modulus_bits) -> float:
        return noisy_sum_wrap_bound(modulus_bits=bits, clients=max_cohort, norm=clip / gamma, dim=padded,
                                    local_variance=variance_at(gamma))

    finest, coarsest = clip / 2**30, clip * 1e6  # the scaled clip must fit in 31 bits; ≈ no signal
    if wraps(coarsest) > wrap_probability:
        fewest = next((b for b in range(modulus_bits + 1, 63) if wraps(coarsest, b) <= wrap_probability), None)
        raise ValueError(f"{modulus_bits} bits cannot hold the noisy sum of {max_cohort} devices "
                         f"(P(wrap) ≤ {wrap_probability:g}) at this budget; use at least {fewest} bits, "
                         "a smaller cohort bound or a larger epsilon")
    if wraps(finest) <= wrap_probability:
        gamma = finest
    else:
        lo, hi = finest, coarsest  # invariant: lo infeasible, hi feasible (P(wrap) falls as γ grows)
        for _ in range(_SEARCH_STEPS):
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if wraps(mid) <= wrap_probability else (mid, hi)
        gamma = hi
    variance = variance_at(gamma)
    return DistributedPlan(
        modulus_bits=modulus_bits, gamma=gamma, local_variance=variance, clip=float(clip), dim=dim,
        min_survivors=min_survivors, max_cohort=max_cohort, beta=beta, sample_rate=sample_rate, rounds=rounds,
        delta=delta, epsilon=epsilon(gamma, variance, sample_rate), epsilon_server=epsilon(gamma, variance, 1.0),
        wrap_probability=wraps(gamma))


def server_epsilon_with(plan: DistributedPlan, survivors: int) -> float:
    """The server's ε (no amplification) had every round summed ``survivors`` ≥ n_min devices."""
    require_int("survivors", survivors, minimum=plan.min_survivors)
    return ddp_epsilon(clip=plan.clip, gamma=plan.gamma, local_variance=plan.local_variance, survivors=survivors,
                       dim=plan.dim, beta=plan.beta, sample_rate=1.0, rounds=plan.rounds, delta=plan.delta,
                       max_survivors=max(plan.max_cohort, survivors))


def format_distributed_plans(plans: list[DistributedPlan], *, expected_cohort: int | None = None) -> str:
    """One row per plan: bits, γ, σ² (grid), device noise std, z at n_min, rounding inflation,
    ε released, ε server (n_min), ε server if ``expected_cohort`` devices survive, P(wrap)."""
    header = ["bits", "gamma", "sigma2_grid", "device_std", "z@n_min", "inflation", "eps_released",
              "eps_server"]
    if expected_cohort is not None:
        header.append(f"eps_server@{expected_cohort}")
    header.append("P(wrap)<=")
    rows = [header]
    for plan in plans:
        row = [str(plan.modulus_bits), f"{plan.gamma:.4g}", str(plan.local_variance), f"{plan.local_std:.4g}",
               f"{plan.noise_multiplier:.3f}", f"{plan.norm_inflation:.4f}", f"{plan.epsilon:.3f}",
               f"{plan.epsilon_server:.2f}"]
        if expected_cohort is not None:
            row.append(f"{server_epsilon_with(plan, max(expected_cohort, plan.min_survivors)):.2f}")
        row.append(f"{plan.wrap_probability:.1e}")
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
