"""Cohorts are secret and each client's draw is its own (issue #11, item 1): what amplification by
sampling assumes."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import RunConfig
from common.data import load_interactions
from common.data.splits import split_interactions
from common.evaluation import EvalSets
from common.inprocess import run_inprocess
from common.sampling import poisson_sample, uniform_coins
from tests.conftest import write_block_csv


@pytest.mark.parametrize("seed", [None, 0])
def test_poisson_sampling_has_the_right_rate(seed):
    ids = list(range(2000))
    sizes = [len(poisson_sample(ids, 0.1, seed=seed, server_round=r)) for r in range(1, 51)]
    assert 190 < np.mean(sizes) < 210  # expected 200, sd of the mean ≈ 1.9
    assert np.std(sizes) > 5  # Poisson, not a fixed cohort size
    coins = uniform_coins(np.arange(20000), seed=seed, server_round=3)
    assert np.all((coins >= 0) & (coins < 1))
    hist, _ = np.histogram(coins, bins=10, range=(0, 1))
    chi2 = float(np.sum((hist - 2000) ** 2 / 2000))
    assert chi2 < 30  # 9 degrees of freedom: p ≈ 4e-4


def test_default_cohorts_are_secret_and_never_repeat():
    assert RunConfig().fed.cohort_seed is None  # the default draws from the OS CSPRNG
    ids = list(range(500))
    assert poisson_sample(ids, 0.3, seed=None, server_round=1) != poisson_sample(ids, 0.3, seed=None, server_round=1)


def test_removing_one_client_changes_nobody_elses_draw():
    """Add/remove analysis: a user's absence must not move the other users' coins (the old sampler
    drew by sorted position, so removing client 7 shifted everyone after it)."""
    ids = list(range(1000))
    without = [c for c in ids if c != 7]
    for rnd in range(1, 6):
        full = poisson_sample(ids, 0.3, seed=11, server_round=rnd)
        assert poisson_sample(without, 0.3, seed=11, server_round=rnd) == [c for c in full if c != 7]
    np.testing.assert_array_equal(uniform_coins(np.array(without), seed=11, server_round=2),
                                  uniform_coins(np.array(ids), seed=11, server_round=2)[np.array(without)])


def test_a_seeded_cohort_is_reproducible_only_when_asked_for():
    ids = list(range(300))
    a = poisson_sample(ids, 0.2, seed=5, server_round=4)
    assert a == poisson_sample(list(reversed(ids)), 0.2, seed=5, server_round=4)
    assert a != poisson_sample(ids, 0.2, seed=5, server_round=5)
    assert a != poisson_sample(ids, 0.2, seed=6, server_round=4)


def test_a_runs_config_does_not_determine_its_cohorts(tmp_path):
    """Two runs of the same default config draw different cohorts (the old code seeded them with
    the config's seed, so anyone holding config.json could replay every round)."""
    csv = write_block_csv(tmp_path / "r.csv", n_users=40)
    sets = EvalSets.from_split(split_interactions(load_interactions(str(csv)), "random", seed=0))
    cfg = RunConfig.from_flat({"data.source": str(csv), "fed.rounds": 12, "fed.sample-rate": 0.5, "model.dim": 4,
                               "dp.enabled": False, "fed.eval-every": 100})
    counts = [[r["participants"] for r in run_inprocess(cfg, sets, final_eval=False).rounds] for _ in range(2)]
    assert counts[0] != counts[1]
    seeded = cfg.replace(**{"fed.sampling-seed": 3})
    again = [[r["participants"] for r in run_inprocess(seeded, sets, final_eval=False).rounds] for _ in range(2)]
    assert again[0] == again[1]
