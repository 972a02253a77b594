"""Planning distributed DP: the noise meets the budget and no less noise would, the grid is the
finest the field can hold, too few bits are refused, and the ML-100K plan of issue #14."""

from __future__ import annotations

import math
import re

import pytest
from scipy.stats import binom

from common.privacy.ddgauss import DEFAULT_BETA
from common.privacy.distributed_plan import (
    cohort_bound,
    ddp_epsilon,
    format_distributed_plans,
    plan_distributed,
    server_epsilon_with,
)
from common.privacy.ledger import Accountant, PrivacyLedger, Relation, Unit
from common.secure_sum import noisy_sum_wrap_bound

SMALL = {"target_epsilon": 4.0, "delta": 1e-5, "rounds": 50, "sample_rate": 0.05, "min_survivors": 10,
         "max_cohort": 40, "clip": 0.5, "dim": 5000}


def eps(plan, *, variance=None, gamma=None, q=None) -> float:
    return ddp_epsilon(clip=plan.clip, gamma=plan.gamma if gamma is None else gamma,
                       local_variance=plan.local_variance if variance is None else variance,
                       survivors=plan.min_survivors, dim=plan.dim, beta=plan.beta,
                       sample_rate=plan.sample_rate if q is None else q, rounds=plan.rounds, delta=plan.delta)


@pytest.mark.parametrize("bits", [14, 18])
def test_the_plan_meets_the_target_with_the_least_noise_and_the_finest_grid(bits):
    plan = plan_distributed(modulus_bits=bits, **SMALL)
    assert plan.epsilon == pytest.approx(eps(plan)) and plan.epsilon <= SMALL["target_epsilon"]
    assert eps(plan, variance=math.floor(plan.local_variance * 0.98)) > SMALL["target_epsilon"]
    assert plan.wrap_probability <= 1e-9
    finer = plan.gamma * 0.98
    from common.privacy.distributed_plan import _largest_scale, _variance_for  # the plan's own search
    scale = _largest_scale(4.0, 1e-5, 50, 0.05)
    variance = _variance_for(finer, scale, clip=0.5, padded=8192, beta=DEFAULT_BETA, n_min=10,
                             check=lambda g, v: eps(plan, gamma=g, variance=v) <= 4.0)
    assert noisy_sum_wrap_bound(modulus_bits=bits, clients=40, norm=0.5 / finer, dim=8192,
                                local_variance=variance) > 1e-9  # a finer grid no longer fits the field
    assert plan.epsilon_server == pytest.approx(eps(plan, q=1.0)) and plan.epsilon_server > plan.epsilon


def test_more_bits_waste_less_on_rounding():
    plans = [plan_distributed(modulus_bits=b, **SMALL) for b in (14, 16, 20, 24)]
    inflation = [p.norm_inflation for p in plans]
    assert inflation == sorted(inflation, reverse=True) and inflation[-1] < 1.001 < inflation[0]
    z = [p.noise_multiplier for p in plans]
    assert z == sorted(z, reverse=True)


def test_the_plan_can_bind_the_servers_epsilon_instead():
    plan = plan_distributed(modulus_bits=20, amplification=False, **SMALL)
    assert plan.epsilon_server <= 4.0 and plan.epsilon < plan.epsilon_server
    assert plan.noise_multiplier > plan_distributed(modulus_bits=20, **SMALL).noise_multiplier


def test_too_few_bits_are_refused_naming_the_fewest_that_work():
    with pytest.raises(ValueError, match=r"use at least (\d+) bits") as info:
        plan_distributed(modulus_bits=8, **SMALL)
    fewest = int(re.search(r"use at least (\d+) bits", str(info.value)).group(1))
    plan_distributed(modulus_bits=fewest, **SMALL)
    with pytest.raises(ValueError):
        plan_distributed(modulus_bits=fewest - 1, **SMALL)


def test_the_cohort_bound_is_a_binomial_quantile():
    m = cohort_bound(943, 0.1, 1e-9)
    assert binom.sf(m, 943, 0.1) <= 1e-9 < binom.sf(m - 1, 943, 0.1)
    assert m == 154 and cohort_bound(10, 1.0) == 10


def test_a_plan_gives_the_ledger_event_and_the_device_parameters():
    plan = plan_distributed(modulus_bits=16, **SMALL)
    ledger = PrivacyLedger(delta=1e-5, unit=Unit.USER, relation=Relation.ADD_OR_REMOVE_ONE)
    for r in range(1, 51):
        ledger.record(plan.event(server_round=r, parameters=("item_embeddings",)))
    assert ledger.epsilon(Accountant.RDP) == pytest.approx(plan.epsilon, rel=1e-9)
    assert ledger.epsilon(amplification=False) == pytest.approx(plan.epsilon_server, rel=1e-9)
    p = plan.params()
    assert (p.gamma, p.local_variance, p.modulus_bits, p.min_survivors) == \
        (plan.gamma, plan.local_variance, 16, 10)
    assert server_epsilon_with(plan, 40) < plan.epsilon_server
    table = format_distributed_plans([plan], expected_cohort=25)
    assert "eps_server@25" in table and f"{plan.epsilon:.3f}" in table


def test_ml100k_plan_of_issue_14():
    """ε = 8, δ = 1e-4, 150 rounds, q = 0.1, C = 1, d = 109,330, n_min = 4, a field for the
    1 − 1e-9 quantile of the cohort (154 of 943): 12 bits cannot hold 154 devices' noise sized for 4;
    16 and 20 bits can, and at 20 bits rounding costs 0.03 % of the clip."""
    common = {"target_epsilon": 8.0, "delta": 1e-4, "rounds": 150, "sample_rate": 0.1, "min_survivors": 4,
              "max_cohort": 154, "clip": 1.0, "dim": 109_330}
    with pytest.raises(ValueError, match="at least 15 bits"):
        plan_distributed(modulus_bits=12, **common)
    p16, p20 = (plan_distributed(modulus_bits=b, **common) for b in (16, 20))
    for p in (p16, p20):
        assert 7.99 < p.epsilon <= 8.0 and 95 < p.epsilon_server < 110
    assert p20.norm_inflation < 1.001 < 1.05 < p16.norm_inflation
    assert 1.1 < p20.noise_multiplier < 1.2  # vs central DP's 1.023 at the same target: Zhu-Wang's price
    assert server_epsilon_with(p20, 94) < 12
