"""Plan a run before it starts: the noise a privacy budget allows, and what a σ costs."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

from common.privacy._validate import (
    require_delta,
    require_int,
    require_positive,
    require_sample_rate,
)
from common.privacy.analysis import Release, pld_epsilon, rdp_epsilon
from common.privacy.ledger import Accountant, Relation

#: σ searched by :func:`plan_noise_multiplier`, on a grid of 0.001.
SIGMA_RANGE: tuple[float, float] = (0.1, 1000.0)
_GRID = 1000  # grid points per unit σ (3 decimals)


def sample_rate_from(clients_per_round: int, population: int) -> float:
    """Poisson sampling rate q of ``clients_per_round`` expected out of ``population``.

    Raises
    ------
    ValueError
        Unless ``1 <= clients_per_round <= population``.
    """
    require_int("clients_per_round", clients_per_round, minimum=1)
    require_int("population", population, minimum=1)
    if clients_per_round > population:
        raise ValueError(
            f"clients_per_round ({clients_per_round}) exceeds population ({population})."
        )
    return clients_per_round / population


def epsilon_for(
    *,
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    rounds: int,
    steps_per_round: int = 1,
    accountant: Accountant = Accountant.RDP,
    relation: Relation = Relation.ADD_OR_REMOVE_ONE,
) -> float:
    """ε of ``rounds × steps_per_round`` identical releases (what a ledger would report);
    ``sample_rate`` 1.0 claims no amplification."""
    _check_common(sample_rate=sample_rate, delta=delta, rounds=rounds, steps=steps_per_round)
    require_positive("noise_multiplier", noise_multiplier)
    if not isinstance(relation, Relation):
        raise ValueError(f"relation must be a Relation, got {relation!r}.")
    releases = [Release(float(noise_multiplier), float(sample_rate), rounds * steps_per_round, relation.value)]
    if accountant is Accountant.RDP:
        return rdp_epsilon(releases, delta)
    if accountant is Accountant.PLD:
        return pld_epsilon(releases, delta)
    raise ValueError(f"accountant must be an Accountant, got {accountant!r}.")


def plan_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    sample_rate: float,
    steps_per_round: int = 1,
    accountant: Accountant = Accountant.RDP,
    relation: Relation = Relation.ADD_OR_REMOVE_ONE,
) -> float:
    """Smallest σ on a 0.001 grid in :data:`SIGMA_RANGE` whose ε is at most the target.

    ε falls as σ grows, so a binary search over the grid finds the smallest σ that meets
    the target; only σ values that were checked to meet it are returned (rounded up,
    never down). A PLD plan is bracketed by the RDP plan, since PLD ε ≤ RDP ε.

    Parameters
    ----------
    target_epsilon:
        The budget ε for the whole run (> 0).
    delta:
        δ of the guarantee, 0 < δ < 1.
    rounds:
        Number of releases of the run (≥ 1).
    sample_rate:
        Poisson sampling rate q per round, 0 < q ≤ 1.
    steps_per_round:
        Mechanism runs per round (local DP-SGD steps; 1 for DP-FedAvg).
    accountant:
        RDP or PLD.
    relation:
        The neighbouring relation (replace-one: two contributions differ by up to 2C).

    Returns
    -------
    float
        σ with three decimals; ``SIGMA_RANGE[0]`` when even that meets the target.

    Raises
    ------
    ValueError
        When even σ = ``SIGMA_RANGE[1]`` exceeds the target, or on invalid arguments.
    """
    require_positive("target_epsilon", target_epsilon)
    _check_common(sample_rate=sample_rate, delta=delta, rounds=rounds, steps=steps_per_round)
    if not isinstance(accountant, Accountant):
        raise ValueError(f"accountant must be an Accountant, got {accountant!r}.")

    def cost(kind: Accountant) -> Callable[[int], float]:
        @functools.cache
        def epsilon_at(k: int) -> float:  # ε at σ = k / 1000; memoised: the search revisits
            return epsilon_for(
                noise_multiplier=k / _GRID,
                sample_rate=sample_rate,
                delta=delta,
                rounds=rounds,
                steps_per_round=steps_per_round,
                accountant=kind,
                relation=relation,
            )

        return epsilon_at

    k_min, k_max = round(SIGMA_RANGE[0] * _GRID), round(SIGMA_RANGE[1] * _GRID)
    rdp_cost = cost(Accountant.RDP)
    rdp_k = _smallest_meeting(rdp_cost, target_epsilon, k_min, k_max)
    if accountant is Accountant.RDP:
        if rdp_k is None:
            raise _unreachable(target_epsilon, rdp_cost(k_max), accountant)
        return rdp_k / _GRID

    pld_cost = cost(Accountant.PLD)
    hi = k_max if rdp_k is None else rdp_k
    if pld_cost(hi) > target_epsilon:  # PLD ≤ RDP; only fails when RDP found nothing
        raise _unreachable(target_epsilon, pld_cost(hi), accountant)
    # Step down from the RDP plan rather than bisecting from σ = 0.1: a PLD at tiny σ has
    # an enormous support and can take many seconds.
    lo = hi
    while lo > k_min:
        lo = max(k_min, math.floor(lo * 0.8))
        if pld_cost(lo) > target_epsilon:
            break
        hi = lo
    else:
        return hi / _GRID
    found = _smallest_meeting(pld_cost, target_epsilon, lo, hi)
    assert found is not None  # hi meets the target
    return found / _GRID


def plan_local_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    accountant: Accountant = Accountant.RDP,
) -> float:
    """σ for local DP (``dp.mode = local``): each device adds N(0, (σC)²) to its update clipped to
    C. Two updates of one device differ by up to 2C (replace-one) and sampling does not amplify
    (the server sees who reported): ``rounds`` unsampled replace-one releases.
    """
    return plan_noise_multiplier(target_epsilon=target_epsilon, delta=delta, rounds=rounds, sample_rate=1.0,
                                 accountant=accountant, relation=Relation.REPLACE_ONE)


def format_plan(
    *,
    noise_multipliers: Sequence[float],
    delta: float,
    rounds: int,
    sample_rate: float,
    steps_per_round: int = 1,
    target_epsilon: float | None = None,
    relation: Relation = Relation.ADD_OR_REMOVE_ONE,
) -> str:
    """A small table of what each σ costs under both accountants (under ``relation``).

    Returns
    -------
    str
        One header line and one row per σ: σ, ε (RDP), ε (PLD), q, rounds, steps per
        round, δ, and whether PLD ε meets ``target_epsilon`` when one is given.
    """
    if not noise_multipliers:
        raise ValueError("noise_multipliers must name at least one σ.")
    header = ["sigma", "eps_rdp", "eps_pld", "q", "rounds", "steps/round", "delta"]
    if target_epsilon is not None:
        require_positive("target_epsilon", target_epsilon)
        header.append(f"pld<={target_epsilon:g}")
    rows = [header]
    for sigma in noise_multipliers:
        eps_rdp, eps_pld = (
            epsilon_for(
                noise_multiplier=sigma,
                sample_rate=sample_rate,
                delta=delta,
                rounds=rounds,
                steps_per_round=steps_per_round,
                accountant=accountant,
                relation=relation,
            )
            for accountant in (Accountant.RDP, Accountant.PLD)
        )
        row = [
            f"{sigma:.3f}",
            f"{eps_rdp:.3f}",
            f"{eps_pld:.3f}",
            f"{sample_rate:.4g}",
            str(rounds),
            str(steps_per_round),
            f"{delta:.0e}",
        ]
        if target_epsilon is not None:
            row.append("yes" if eps_pld <= target_epsilon else "no")
        rows.append(row)
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(lines)


def _smallest_meeting(cost: Callable[[int], float], target: float, lo: int, hi: int) -> int | None:
    """Smallest k in [lo, hi] with ``cost(k) <= target`` for a non-increasing cost."""
    if cost(hi) > target:
        return None
    if cost(lo) <= target:
        return lo
    while hi - lo > 1:  # invariant: cost(lo) > target >= cost(hi)
        mid = (lo + hi) // 2
        if cost(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def _unreachable(target: float, best: float, accountant: Accountant) -> ValueError:
    return ValueError(
        f"target_epsilon={target:g} is unreachable with sigma <= {SIGMA_RANGE[1]:g} "
        f"({accountant.value.upper()} epsilon there is {best:.4g}); release fewer rounds, "
        "sample fewer clients or accept a larger epsilon."
    )


def _check_common(*, sample_rate: float, delta: float, rounds: int, steps: int) -> None:
    require_sample_rate("sample_rate", sample_rate)
    require_delta("delta", delta)
    require_int("rounds", rounds, minimum=1)
    require_int("steps_per_round", steps, minimum=1)
