"""Privacy ledger and planning: golden values, composition laws, state, validation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from typing import Any

import pytest

from common.privacy import (
    STATE_VERSION,
    Accountant,
    MechanismEvent,
    PrivacyLedger,
    Relation,
    Sampling,
    Unit,
    epsilon_for,
    format_plan,
    plan_noise_multiplier,
    sample_rate_from,
)

OPACUS_GOLDEN = 7.32911117143  # opacus tests: σ=1.5, q=0.04, 2250 steps, δ=1e-5
Q_ML100K = 100 / 943


def event(
    sigma: float = 1.0,
    q: float = Q_ML100K,
    steps: int = 1,
    round: int = 1,
    sampling: Sampling | None = None,
) -> MechanismEvent:
    return MechanismEvent(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        sampling=sampling or (Sampling.POISSON if q < 1 else Sampling.NONE),
        parameters=("item_embeddings", "item_bias"),
        round=round,
    )


def ledger_of(
    *events: MechanismEvent, delta: float = 1e-3, relation: Relation = Relation.ADD_OR_REMOVE_ONE
) -> PrivacyLedger:
    ledger = PrivacyLedger(delta=delta, unit=Unit.USER, relation=relation)
    for e in events:
        ledger.record(e)
    return ledger


def user_rounds(n: int, sigma: float = 1.0, q: float = Q_ML100K, steps: int = 1) -> PrivacyLedger:
    return ledger_of(*(event(sigma, q, steps, round=r) for r in range(1, n + 1)))


# --- golden values -----------------------------------------------------------------------


def test_golden_rdp_matches_opacus() -> None:
    from opacus.accountants import RDPAccountant

    ledger = ledger_of(event(1.5, 0.04, 2250), delta=1e-5)
    eps = ledger.epsilon(Accountant.RDP)
    assert eps == pytest.approx(OPACUS_GOLDEN, abs=0.02)

    opacus = RDPAccountant()
    opacus.history = [(1.5, 0.04, 2250)]
    assert eps == pytest.approx(opacus.get_epsilon(1e-5), rel=0.01)


def test_user_level_dp_fedavg_reference() -> None:
    ledger = user_rounds(20)
    assert ledger.epsilon(Accountant.RDP) == pytest.approx(2.87, rel=0.03)
    assert ledger.epsilon(Accountant.PLD) == pytest.approx(2.26, rel=0.03)


def test_no_sampling_means_no_amplification() -> None:
    # REFERENCE.md: without amplification, 100 rounds at δ=1e-5: σ=1 → ≈96, σ=5 → ≈10.7.
    loud = ledger_of(*(event(1.0, 1.0, round=r) for r in range(100)), delta=1e-5)
    quiet = ledger_of(*(event(5.0, 1.0, round=r) for r in range(100)), delta=1e-5)
    assert loud.epsilon() == pytest.approx(96.1, rel=0.01)
    assert quiet.epsilon() == pytest.approx(10.7, rel=0.01)
    # Sampling 10% of users must cost less than releasing every user every round.
    sampled = ledger_of(*(event(5.0, 0.1, round=r) for r in range(100)), delta=1e-5)
    assert sampled.epsilon() < quiet.epsilon()


def test_heterogeneous_events_match_opacus_history() -> None:
    from opacus.accountants import RDPAccountant

    history = [(1.1, 0.01, 300), (0.8, 0.02, 50), (2.0, 0.05, 700)]
    ledger = ledger_of(
        *(
            event(s, q, n, round=r)
            for r, (s, q, n) in enumerate(history)
        ),
        delta=1e-5,
    )
    opacus = RDPAccountant()
    opacus.history = list(history)
    assert ledger.epsilon() == pytest.approx(opacus.get_epsilon(1e-5), rel=0.01)


# --- composition laws --------------------------------------------------------------------


@pytest.mark.parametrize("accountant", list(Accountant))
def test_epsilon_strictly_increases_over_rounds(accountant: Accountant) -> None:
    ledger = user_rounds(15)
    history = ledger.epsilon_history(accountant)
    assert [r for r, _ in history] == list(range(1, 16))
    eps = [e for _, e in history]
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    assert eps[-1] == pytest.approx(ledger.epsilon(accountant), rel=1e-6)


@pytest.mark.parametrize("accountant", list(Accountant))
def test_history_is_incremental_and_matches_a_fresh_ledger(accountant: Accountant) -> None:
    ledger = user_rounds(5)
    ledger.epsilon_history(accountant)  # warm the incremental cache at round 5
    # Two releases in round 6 (different σ), then round 7.
    for e in (event(1.0, round=6), event(2.0, round=6), event(1.0, round=7)):
        ledger.record(e)
    fresh = ledger_of(*ledger.events)
    got, want = ledger.epsilon_history(accountant), fresh.epsilon_history(accountant)
    assert [r for r, _ in got] == [1, 2, 3, 4, 5, 6, 7]
    assert [e for _, e in got] == pytest.approx([e for _, e in want], rel=1e-9)
    # Another δ is a different curve, not a stale cache.
    assert ledger.epsilon_history(accountant, delta=1e-5)[-1][1] > got[-1][1]


@pytest.mark.parametrize("q", [0.03, 1.0])
@pytest.mark.parametrize(("accountant", "rel"), [(Accountant.RDP, 1e-6), (Accountant.PLD, 0.01)])
def test_rounds_compose_like_one_long_event(accountant: Accountant, rel: float, q: float) -> None:
    k, s = 12, 25
    sigma = 1.2 if q < 1 else 20.0
    rounds = ledger_of(
        *(event(sigma, q, s, round=r) for r in range(k))
    )
    single = ledger_of(event(sigma, q, k * s))
    assert rounds.epsilon(accountant) == pytest.approx(single.epsilon(accountant), rel=rel)
    # The history composes round by round, not as one merged event: it must agree too.
    assert rounds.epsilon_history(accountant)[-1][1] == pytest.approx(
        single.epsilon(accountant), rel=rel
    )


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [(1.5, 0.04, 2250), (1.0, Q_ML100K, 20), (0.7, 0.01, 500), (3.0, 1.0, 10)],
)
def test_pld_is_not_above_rdp(sigma: float, q: float, steps: int) -> None:
    ledger = ledger_of(event(sigma, q, steps), delta=1e-5)
    assert 0 < ledger.epsilon(Accountant.PLD) <= ledger.epsilon(Accountant.RDP)


def test_pld_matches_opacus_prv() -> None:
    from opacus.accountants import PRVAccountant

    ledger = ledger_of(event(1.5, 0.04, 2250), delta=1e-5)
    prv = PRVAccountant()
    prv.history = [(1.5, 0.04, 2250)]
    assert ledger.epsilon(Accountant.PLD) == pytest.approx(prv.get_epsilon(1e-5), rel=0.02)


def test_pld_of_2000_steps_is_fast() -> None:
    ledger_of(event(1.0, 0.5, 1)).epsilon(Accountant.PLD)  # pay the dp_accounting import
    ledger = ledger_of(event(1.1, 0.02, 2000), delta=1e-5)
    start = time.perf_counter()
    ledger.epsilon(Accountant.PLD)
    assert time.perf_counter() - start < 2.0


def test_empty_ledger_has_spent_nothing() -> None:
    ledger = PrivacyLedger(delta=1e-5, unit=Unit.USER, relation=Relation.ADD_OR_REMOVE_ONE)
    assert ledger.epsilon() == 0.0 and ledger.epsilon(Accountant.PLD) == 0.0
    assert ledger.epsilon_history() == [] and ledger.events == ()


# --- would_exceed --------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", list(Accountant))
def test_would_exceed_at_the_boundary(accountant: Accountant) -> None:
    ledger = user_rounds(10)
    nxt = event(round=11)
    after = ledger_of(*ledger.events, nxt).epsilon(accountant)
    assert ledger.would_exceed(nxt, target_epsilon=after - 1e-6, accountant=accountant)
    assert not ledger.would_exceed(nxt, target_epsilon=after + 1e-6, accountant=accountant)
    assert not ledger.would_exceed(nxt, target_epsilon=after, accountant=accountant)
    assert len(ledger.events) == 10  # asking releases nothing
    assert ledger.epsilon(accountant) < after


# --- state ----------------------------------------------------------------------------------


def test_state_dict_round_trip_through_json() -> None:
    ledger = user_rounds(8)
    ledger.record(event(2.0, round=8))
    state = json.loads(json.dumps(ledger.state_dict()))
    assert state["version"] == STATE_VERSION
    restored = PrivacyLedger.from_state_dict(state)
    assert restored.events == ledger.events
    for accountant in Accountant:
        assert restored.epsilon(accountant) == ledger.epsilon(accountant)
        assert restored.epsilon_history(accountant) == ledger.epsilon_history(accountant)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("delta", 1e-4, "delta"),
        ("version", STATE_VERSION + 1, "version"),
        ("unit", "silo", "unit"),
        ("relation", "replace-one", "relation"),
    ],
)
def test_mismatched_state_is_refused(key: str, value: object, message: str) -> None:
    state = {**user_rounds(3).state_dict(), key: value}
    with pytest.raises(ValueError, match=message):
        PrivacyLedger(delta=1e-3, unit=Unit.USER, relation=Relation.ADD_OR_REMOVE_ONE).load_state_dict(state)


def test_state_that_forgets_spent_privacy_is_refused() -> None:
    ledger = user_rounds(5)
    older = user_rounds(3).state_dict()
    with pytest.raises(ValueError, match="forget"):
        ledger.load_state_dict(older)
    ledger.load_state_dict(user_rounds(7).state_dict())  # an extension is fine
    assert len(ledger.events) == 7


def test_restored_ledger_never_loses_epsilon() -> None:
    # A client reloads its ledger from context.state every round and adds that round.
    state = ledger_of(delta=1e-5).state_dict()
    seen = {accountant: 0.0 for accountant in Accountant}
    for r in range(1, 6):
        ledger = ledger_of(delta=1e-5)
        ledger.load_state_dict(json.loads(json.dumps(state)))
        for accountant in Accountant:
            assert ledger.epsilon(accountant) == seen[accountant]
        ledger.record(event(1.0, 0.05, 40, round=r))
        for accountant in Accountant:
            assert ledger.epsilon(accountant) > seen[accountant]
            seen[accountant] = ledger.epsilon(accountant)
        state = ledger.state_dict()
    assert len(state["events"]) == 5


# --- planning -------------------------------------------------------------------------------


def test_planned_sigma_is_the_smallest_that_meets_the_target() -> None:
    common: dict[str, Any] = dict(target_epsilon=2.0, delta=1e-3, rounds=20, sample_rate=Q_ML100K)
    sigma = plan_noise_multiplier(**common)
    assert sigma == round(sigma, 3)
    check: dict[str, Any] = dict(sample_rate=Q_ML100K, delta=1e-3, rounds=20)
    assert epsilon_for(noise_multiplier=sigma, **check) <= 2.0
    assert epsilon_for(noise_multiplier=sigma - 0.01, **check) > 2.0
    assert epsilon_for(noise_multiplier=sigma - 0.001, **check) > 2.0
    # Same numbers as a ledger that actually runs the plan.
    assert user_rounds(20, sigma=sigma).epsilon() <= 2.0


def test_pld_plan_needs_less_noise_and_meets_its_target() -> None:
    common: dict[str, Any] = dict(target_epsilon=2.0, delta=1e-3, rounds=20, sample_rate=Q_ML100K)
    sigma = plan_noise_multiplier(**common, accountant=Accountant.PLD)
    assert sigma < plan_noise_multiplier(**common)
    check: dict[str, Any] = dict(
        sample_rate=Q_ML100K, delta=1e-3, rounds=20, accountant=Accountant.PLD
    )
    assert epsilon_for(noise_multiplier=sigma, **check) <= 2.0
    assert epsilon_for(noise_multiplier=sigma - 0.001, **check) > 2.0


@pytest.mark.parametrize("accountant", list(Accountant))
def test_loose_target_gets_the_smallest_sigma_searched(accountant: Accountant) -> None:
    sigma = plan_noise_multiplier(
        target_epsilon=1e4, delta=1e-5, rounds=1, sample_rate=0.01, accountant=accountant
    )
    assert sigma == 0.1


def test_unreachable_target_raises() -> None:
    with pytest.raises(ValueError, match="unreachable"):
        plan_noise_multiplier(target_epsilon=0.01, delta=1e-5, rounds=10_000, sample_rate=1.0)


def test_sample_rate_and_format_plan() -> None:
    assert sample_rate_from(100, 943) == pytest.approx(Q_ML100K)
    with pytest.raises(ValueError, match="exceeds"):
        sample_rate_from(944, 943)
    table = format_plan(
        noise_multipliers=[1.0], delta=1e-3, rounds=20, sample_rate=Q_ML100K, target_epsilon=2.5
    )
    header, row = table.splitlines()
    assert header.split()[:3] == ["sigma", "eps_rdp", "eps_pld"]
    cells = row.split()
    assert cells[0] == "1.000" and cells[-1] == "yes"
    assert float(cells[1]) == pytest.approx(2.87, abs=0.01)
    assert float(cells[2]) == pytest.approx(2.26, abs=0.01)


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": -0.1}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"steps": True}, "steps"),
        ({"steps": 2.0}, "steps"),
        ({"round": -1}, "round"),
        ({"parameters": ["item_embeddings"]}, "parameters"),
        ({"parameters": ()}, "parameters"),
        ({"sampling": "poisson"}, "sampling"),
        ({"sampling": None}, "sampling"),
    ],
)
def test_invalid_events_are_refused(changes: dict[str, object], message: str) -> None:
    fields: dict[str, Any] = dict(
        noise_multiplier=1.0,
        sample_rate=0.1,
        steps=1,
        sampling=Sampling.POISSON,
        parameters=("item_embeddings",),
        round=0,
    )
    with pytest.raises(ValueError, match=message):
        MechanismEvent(**{**fields, **changes})  # type: ignore[arg-type]


def test_ledger_refuses_misuse() -> None:
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(delta=0.0, unit=Unit.USER, relation=Relation.ADD_OR_REMOVE_ONE)
    with pytest.raises(TypeError):
        PrivacyLedger(1e-5, Unit.USER, Relation.ADD_OR_REMOVE_ONE)  # type: ignore[misc]  # keyword-only
    with pytest.raises(ValueError, match="relation"):
        PrivacyLedger(delta=1e-5, unit=Unit.USER, relation="replace-one")  # type: ignore[arg-type]
    ledger = user_rounds(3)
    with pytest.raises(ValueError, match="go back"):
        ledger.record(event(round=2))
    with pytest.raises(ValueError, match="target_epsilon"):
        ledger.would_exceed(event(round=4), target_epsilon=0.0)
    assert len(ledger.events) == 3


def test_package_imports_neither_flower_nor_dp_accounting_eagerly() -> None:
    code = (
        "import sys, common.privacy; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('flwr', 'dp_accounting', 'torch')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- relations, sampling and migration ------------------------------------------------------


def test_replace_one_rdp_integrator_matches_closed_forms() -> None:
    import numpy as np

    from common.privacy import analysis

    orders = np.array(analysis.RDP_ORDERS)
    integer = orders == np.round(orders)
    # The same integrator on the add/remove pair gives dp-accounting's subsampled-Gaussian RDP.
    got = analysis._mixture_rdp(1.03, (0.1, 1.0), (0.0, 0.0))
    want = analysis._unit_rdp(1.03, 0.1)
    np.testing.assert_allclose(got[integer], want[integer], rtol=1e-9)
    # Without sampling, replace-one is the Gaussian with twice the sensitivity: α·2²/(2σ²).
    for sigma in (0.5, 3.0, 14.0):
        np.testing.assert_allclose(analysis._mixture_rdp(sigma, (1.0, -1.0), (1.0, 1.0)), 2 * orders / sigma**2,
                                   rtol=1e-9)


def test_silo_users_are_replace_one_and_cost_more_than_add_remove() -> None:
    # Issue #11 (5): a user inside a sampled silo moves its clipped update by up to 2C.
    add = ledger_of(*(event(1.03, 0.1, round=r) for r in range(1, 151)), delta=1e-4)
    rep = ledger_of(*(event(1.03, 0.1, round=r) for r in range(1, 151)), delta=1e-4,
                    relation=Relation.REPLACE_ONE)
    assert add.epsilon(Accountant.PLD) == pytest.approx(6.969, abs=0.005)
    assert rep.epsilon(Accountant.PLD) == pytest.approx(11.315, abs=0.005)  # dp-accounting's REPLACE_ONE
    assert rep.epsilon(Accountant.PLD) <= rep.epsilon(Accountant.RDP) < 2 * rep.epsilon(Accountant.PLD)
    # Sampling still amplifies: far below the same releases without amplification.
    assert rep.epsilon() < rep.epsilon(amplification=False)


def test_local_dp_is_replace_one_without_amplification() -> None:
    # The device's σ is recorded as is; the relation (not a halved σ) accounts for 2C.
    local = ledger_of(*(event(14.25, 0.1, round=r, sampling=Sampling.NONE) for r in range(1, 151)),
                      delta=1e-4, relation=Relation.REPLACE_ONE)
    halved = ledger_of(*(event(14.25 / 2, 1.0, round=r) for r in range(1, 151)), delta=1e-4)
    for accountant in Accountant:
        assert local.epsilon(accountant) == pytest.approx(halved.epsilon(accountant), rel=1e-6)
    assert local.epsilon() <= 8.0
    assert not local.claims_amplification


def test_without_amplification_is_the_unsampled_ledger() -> None:
    sampled = user_rounds(30, sigma=1.0, q=0.1)
    unsampled = ledger_of(*(event(1.0, 1.0, round=r) for r in range(1, 31)))
    for accountant in Accountant:
        assert sampled.epsilon(accountant, amplification=False) == pytest.approx(unsampled.epsilon(accountant),
                                                                                 rel=1e-9)
        assert sampled.epsilon(accountant) < unsampled.epsilon(accountant)
    assert sampled.claims_amplification


def _v1(kind: str, sigma: float, q: float, rounds: int) -> dict[str, Any]:
    return {"version": 1, "delta": 1e-4, "neighbouring": kind,
            "events": [{"noise_multiplier": sigma, "sample_rate": q, "steps": 1, "neighbouring": kind,
                        "parameters": ["item_embeddings", "item_bias"], "round": r, "note": ""}
                       for r in range(1, rounds + 1)]}


def test_version_1_ledgers_migrate_with_the_same_epsilon() -> None:
    user = PrivacyLedger.from_state_dict(_v1("user", 1.03, 0.1, 150))
    assert (user.unit, user.relation) == (Unit.USER, Relation.ADD_OR_REMOVE_ONE)
    assert user.epsilon() == pytest.approx(7.894, abs=0.001)
    local = PrivacyLedger.from_state_dict(_v1("local", 14.25 / 2, 1.0, 150))  # v1 stored σ/2
    assert local.relation is Relation.REPLACE_ONE and local.events[0].noise_multiplier == 14.25
    assert local.epsilon() == pytest.approx(epsilon_for(noise_multiplier=14.25 / 2, sample_rate=1.0, delta=1e-4,
                                                        rounds=150), rel=1e-9)
    with pytest.raises(ValueError, match="record"):
        PrivacyLedger.from_state_dict(_v1("record", 1.0, 0.05, 3))


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    releases=st.lists(
        st.tuples(st.floats(0.5, 20.0), st.sampled_from([0.01, 0.1, 0.5, 1.0]), st.integers(1, 5)),
        min_size=1, max_size=6),
    relation=st.sampled_from(list(Relation)),
)
def test_epsilon_never_decreases_and_survives_a_state_round_trip(releases, relation) -> None:
    ledger = ledger_of(delta=1e-5, relation=relation)
    last = 0.0
    for r, (sigma, q, steps) in enumerate(releases, start=1):
        ledger.record(event(sigma, q, steps, round=r))
        now = ledger.epsilon()
        assert now >= last - 1e-9
        assert ledger.epsilon(amplification=False) >= now - 1e-9
        last = now
    restored = PrivacyLedger.from_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored.epsilon() == ledger.epsilon()
    shorter = {**ledger.state_dict(), "events": ledger.state_dict()["events"][:-1]}
    with pytest.raises(ValueError, match="forget"):
        ledger.load_state_dict(shorter)  # a state that forgets a release is refused
