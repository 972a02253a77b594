"""Accounting of the distributed discrete Gaussian (Kairouz, Liu, Steinke 2021, [KLS21]):
the paper's bounds by hand, the Zhu-Wang amplification against dp-accounting's exact sampled
Gaussian, the limit of many bits (the central Gaussian), monotonicity, and the ledger event."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common.privacy import Accountant, MechanismEvent, PrivacyLedger, Relation, Sampling, Unit, epsilon_for
from common.privacy.analysis import RDP_ORDERS, DdgRelease, rdp_epsilon
from common.privacy.ddgauss import (
    DEFAULT_BETA,
    ddgauss_rdp,
    poisson_subsampled_rdp,
    rdp_curve,
    rounded_l1_bound,
    rounded_l2_bound,
    tau,
)
from common.privacy.ddp_event import DistributedDpEvent
from common.privacy.distributed_plan import ddp_epsilon

D = 1 << 17  # ML-100K's 109,330 item-side values, padded


def ddp_event(round_: int = 1, *, gamma: float = 1e-4, variance: int = 26_000_000, survivors: int = 4,
              q: float = 0.1, sampling: Sampling = Sampling.POISSON, steps: int = 1) -> DistributedDpEvent:
    return DistributedDpEvent(clip=1.0, gamma=gamma, local_variance=variance, survivors=survivors,
                              max_survivors=max(survivors, 154), dim=D,
                              beta=DEFAULT_BETA, sample_rate=q, sampling=sampling, parameters=("item_embeddings",),
                              round=round_, steps=steps)


# ---------------------------------------------------------------- the paper's bounds by hand
def test_the_rounding_bound_is_kls21_theorem_1():
    """Δ₂² = min{c² + d/4 + √(2 ln 1/β)(c + √d/2), (c + √d)²}; with β = e^{-1/2}, √(2 ln 1/β) = 1:
    c = 100, d = 1024 → 10000 + 256 + 116 = 10372."""
    assert rounded_l2_bound(100.0, 1024, DEFAULT_BETA) == pytest.approx(math.sqrt(10372), rel=1e-12)
    assert rounded_l2_bound(100.0, 1024, 0.0) == 132.0  # plain randomized rounding: c + √d
    assert rounded_l2_bound(0.5, 4, DEFAULT_BETA) == pytest.approx(min(2.5, math.sqrt(0.25 + 1 + 1.5)))
    assert rounded_l1_bound(10.0, 1024) == 100.0 and rounded_l1_bound(100.0, 16) == 400.0


def test_tau_is_the_papers_sum():
    """τ = 10·Σ_{k=1}^{n−1} exp(−2π²σ²k/(k+1)): zero for one client; 10·e^{−π²} for two at σ² = 1."""
    assert tau(5.0, 1) == 0.0
    assert tau(1.0, 2) == pytest.approx(10 * math.exp(-math.pi**2), rel=1e-12)
    assert tau(1.0, 3) == pytest.approx(10 * (math.exp(-math.pi**2) + math.exp(-4 * math.pi**2 / 3)), rel=1e-12)
    assert tau(4.0, 100) < tau(1.0, 100) < tau(1.0, 1000)


def test_one_client_is_the_discrete_gaussian_mechanism():
    """With τ = 0 [KLS21] Eq. 17 is α·Δ₂²/(2nσ²): the discrete Gaussian's Δ²/(2σ²)-zCDP (CKS20)."""
    orders = np.array(RDP_ORDERS)
    curve = ddgauss_rdp(orders, l2=30.0, l1=900.0, tau_=0.0, dim=D, clients=1, local_variance=400.0)
    assert np.allclose(curve, orders * 900 / 800)
    # the third term is Theorem 1's second branch: ½·(Δ₂/(√n σ) + τ√d)²·α
    small_tau = ddgauss_rdp(orders, l2=30.0, l1=900.0, tau_=1e-9, dim=D, clients=9, local_variance=400.0)
    assert np.allclose(small_tau, orders / 2 * (30 / 60 + 1e-9 * math.sqrt(D)) ** 2)


def _sampled_gaussian_rdp(sigma: float, q: float, orders: list[float]) -> np.ndarray:
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(orders)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    return np.array(accountant._rdp)


@pytest.mark.parametrize("sigma, q", [(1.0, 0.1), (0.7, 0.01), (2.0, 0.5)])
def test_zhu_wang_bounds_the_exact_sampled_gaussian_and_is_exact_at_order_two(sigma, q):
    orders = list(range(2, 40))
    exact = _sampled_gaussian_rdp(sigma, q, [float(a) for a in orders])
    bound = poisson_subsampled_rdp(np.array(orders) / (2 * sigma**2), q)
    assert bound[0] == pytest.approx(exact[0], rel=1e-9)  # α = 2: 1/(α−1)·log(1 − q² + q²e^{1/σ²})
    assert np.all(bound >= exact * (1 - 1e-9))


def test_zhu_wang_is_nearly_tight_for_rare_sampling():
    """Its factor 3 weighs the terms of q³ and beyond, which vanish against q² as q → 0."""
    gaps = []
    for q in (1e-2, 1e-3, 1e-4):
        exact = _sampled_gaussian_rdp(1.0, q, [2.0, 4.0, 8.0])
        gaps.append(np.max(poisson_subsampled_rdp(np.arange(2, 9) / 2.0, q)[[0, 2, 6]] / exact) - 1)
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.01


# ---------------------------------------------------------------- limits and monotonicity
def test_with_more_bits_the_server_epsilon_falls_to_the_central_gaussians():
    """γ → 0 with the summed noise fixed at z·C: Δ₂ → C/γ and τ → 0, so the unamplified ε tends to
    the Gaussian mechanism's ε at noise multiplier z (dp-accounting), from above."""
    z, n, rounds, delta = 1.0, 4, 150, 1e-4
    central = epsilon_for(noise_multiplier=z, sample_rate=1.0, delta=delta, rounds=rounds)
    gaps = []
    for gamma in (3e-2, 3e-3, 3e-4, 3e-5):
        variance = round((z / gamma) ** 2 / n)
        eps = ddp_epsilon(clip=1.0, gamma=gamma, local_variance=variance, survivors=n, dim=109_330,
                          beta=DEFAULT_BETA, sample_rate=1.0, rounds=rounds, delta=delta)
        gaps.append(eps - central)
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] >= -1e-6 * central
    assert gaps[-1] < 1e-3 * central and gaps[0] > 0.5 * central  # 12-bit-like γ costs a lot


def test_with_more_bits_the_released_epsilon_falls_to_zhu_wangs_gaussian():
    """Amplified, the limit is the Gaussian under the Zhu-Wang bound, which is looser than the exact
    sampled Gaussian that central DP is accounted with: the price of a generic amplification bound."""
    z, n, q, rounds, delta = 1.03, 4, 0.1, 150, 1e-4
    limit = rdp_epsilon([DdgRelease(1 / z, 1 / z, 0.0, 1, 1, 1.0, q, rounds)], delta)
    eps = ddp_epsilon(clip=1.0, gamma=1e-6, local_variance=round((z / 1e-6) ** 2 / n), survivors=n, dim=109_330,
                      beta=DEFAULT_BETA, sample_rate=q, rounds=rounds, delta=delta)
    central = epsilon_for(noise_multiplier=z, sample_rate=q, delta=delta, rounds=rounds)
    assert eps == pytest.approx(limit, rel=1e-3)
    assert central == pytest.approx(7.894, abs=1e-3)  # docs/PRIVACY.md's default run
    assert 1.2 * central < limit < 1.35 * central


@pytest.mark.parametrize("change, direction", [
    ({"rounds": 300}, +1), ({"sample_rate": 0.2}, +1), ({"local_variance": 30_000_000}, -1),
    ({"survivors": 8}, -1), ({"gamma": 2e-4, "local_variance": 6_500_000}, +1), ({"delta": 1e-6}, +1),
])
def test_epsilon_moves_the_right_way(change, direction):
    base = {"clip": 1.0, "gamma": 1e-4, "local_variance": 26_000_000, "survivors": 4, "dim": 109_330,
            "beta": DEFAULT_BETA, "sample_rate": 0.1, "rounds": 150, "delta": 1e-4}
    assert (ddp_epsilon(**{**base, **change}) - ddp_epsilon(**base)) * direction > 0


def test_tau_is_taken_at_the_most_shares_a_round_can_sum():
    """[KLS21]'s τ grows with the number of shares: a bound at n_min alone would not cover a round
    of more devices when σ² is small. Large σ² make τ vanish."""
    def eps(variance: int, max_survivors: int) -> float:
        return ddp_epsilon(clip=1.0, gamma=100.0, local_variance=variance, survivors=4, dim=4096, beta=0.0,
                           max_survivors=max_survivors, sample_rate=1.0, rounds=10, delta=1e-5)

    assert tau(1, 10**6) > 50 * tau(1, 4)
    assert eps(1, 10**6) > eps(1, 4) * 1.05
    assert eps(100, 10**6) == eps(100, 4)  # τ = 0 in floating point


def test_amplification_never_costs():
    curve = lambda q: rdp_curve(RDP_ORDERS, l2=9000.0, l1=9000.0 * 362, tau_=0.0, dim=D, clients=4,  # noqa: E731
                                local_variance=26e6, sample_rate=q)
    assert np.all(curve(0.1) <= curve(1.0)) and np.all(curve(0.01) <= curve(0.1))


# ---------------------------------------------------------------- the ledger
def test_a_ledger_of_distributed_events_reports_both_epsilons():
    ledger = PrivacyLedger(delta=1e-4, unit=Unit.USER, relation=Relation.ADD_OR_REMOVE_ONE)
    for r in range(1, 151):
        ledger.record(ddp_event(r))
    event = ddp_event()
    expected = {q: ddp_epsilon(clip=1.0, gamma=event.gamma, local_variance=event.local_variance, survivors=4,
                               dim=109_330, beta=DEFAULT_BETA, sample_rate=q, rounds=150, delta=1e-4)
                for q in (0.1, 1.0)}
    assert ledger.epsilon() == pytest.approx(expected[0.1], rel=1e-9)
    assert ledger.epsilon(amplification=False) == pytest.approx(expected[1.0], rel=1e-9)  # the server's
    assert ledger.epsilon() < 11 < 90 < ledger.epsilon(amplification=False)
    history = ledger.epsilon_history()
    assert [r for r, _ in history] == list(range(1, 151)) and history[-1][1] == pytest.approx(ledger.epsilon())
    assert event.noise_multiplier == pytest.approx(1e-4 * math.sqrt(4 * 26e6))


def test_distributed_and_gaussian_events_compose_and_survive_a_state_round_trip():
    ledger = PrivacyLedger(delta=1e-4, unit=Unit.USER, relation=Relation.ADD_OR_REMOVE_ONE)
    gaussian = MechanismEvent(noise_multiplier=1.0, sample_rate=0.1, steps=1, sampling=Sampling.POISSON,
                              parameters=("item_embeddings",), round=1)
    ledger.record(gaussian)
    ledger.record(ddp_event(2))
    alone = PrivacyLedger(delta=1e-4, unit=Unit.USER, relation=Relation.ADD_OR_REMOVE_ONE)
    alone.record(gaussian)
    assert ledger.epsilon() > alone.epsilon()
    state = json.loads(json.dumps(ledger.state_dict()))
    assert state["version"] == 2 and state["events"][1]["kind"] == "ddgauss" and "kind" not in state["events"][0]
    restored = PrivacyLedger.from_state_dict(state)
    assert restored.events == ledger.events and restored.epsilon() == ledger.epsilon()
    with pytest.raises(ValueError, match="RDP only"):
        ledger.epsilon(Accountant.PLD)
    state["events"][1]["kind"] = "skellam"
    with pytest.raises(ValueError, match="unknown kind"):
        PrivacyLedger.from_state_dict(state)


def test_a_distributed_event_is_refused_where_its_bound_does_not_hold():
    replace = PrivacyLedger(delta=1e-4, unit=Unit.USER, relation=Relation.REPLACE_ONE)
    replace.record(ddp_event())
    with pytest.raises(ValueError, match="add-or-remove"):
        replace.epsilon()
    with pytest.raises(ValueError, match="power of two"):
        DistributedDpEvent(clip=1.0, gamma=1e-4, local_variance=10, survivors=4, max_survivors=4, dim=109_330, beta=0.5,
                           sample_rate=0.1, sampling=Sampling.POISSON, parameters=("x",), round=1)
    with pytest.raises(ValueError, match="local_variance"):
        ddp_event(variance=0)
    with pytest.raises(ValueError, match="max_survivors"):
        DistributedDpEvent(clip=1.0, gamma=1e-4, local_variance=10, survivors=4, max_survivors=3, dim=D, beta=0.5,
                           sample_rate=0.1, sampling=Sampling.POISSON, parameters=("x",), round=1)
    with pytest.raises(ValueError, match="lacks the key"):  # old code reading a new event fails loudly
        MechanismEvent.from_dict(ddp_event().to_dict())


def test_no_amplification_is_claimed_without_secret_sampling():
    ledger = PrivacyLedger(delta=1e-4, unit=Unit.USER, relation=Relation.ADD_OR_REMOVE_ONE)
    ledger.record(ddp_event(sampling=Sampling.NONE, steps=10))
    assert not ledger.claims_amplification
    assert ledger.epsilon() == ledger.epsilon(amplification=False)
