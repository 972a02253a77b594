"""User-level DP-FedAvg mechanics: clipping on the client, noise once on the server, the budget."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from common import keys
from common.config import DPConfig, RunConfig
from common.data import load_interactions
from common.data.splits import split_interactions
from common.evaluation import EvalSets
from common.inprocess import run_inprocess
from common.models import ClientData, ItemParams
from common.models.mf.model import MFModel
from common.models.mf.params import init_items
from common.privacy import MechanismEvent, Sampling
from common.privacy.dp_fedavg import GaussianNoise, clip_grouped, clip_update, global_norm, ledger_for
from common.rounds import ServerOptimizer, server_update_arrays


def test_clip_update_bounds_the_joint_norm_and_keeps_small_updates():
    rng = np.random.default_rng(0)
    big = [rng.normal(size=(50, 8)) * 3, rng.normal(size=50) * 3]
    clipped, was = clip_update(big, 1.5)
    assert was and global_norm(clipped) <= 1.5
    # direction kept
    assert np.allclose(clipped[0] / np.linalg.norm(clipped[0]), big[0] / np.linalg.norm(big[0]), atol=1e-6)
    small = [x * 1e-3 for x in big]
    kept, was = clip_update(small, 1.5)
    assert not was and np.allclose(kept[0], small[0], atol=1e-7)


@pytest.mark.parametrize("share", [0.0, 0.1, 0.5])
def test_per_group_clipping_keeps_the_joint_norm_within_c(share):
    rng = np.random.default_rng(1)
    arrays = [rng.normal(size=(40, 4)) * 10, rng.normal(size=40) * 10]
    out = clip_grouped(arrays, 2.0, share)
    assert global_norm(out) <= 2.0 + 1e-6
    if share > 0:
        assert np.linalg.norm(out[1]) <= 2.0 * np.sqrt(share) + 1e-6
        assert np.linalg.norm(out[0]) <= 2.0 * np.sqrt(1 - share) + 1e-6


@pytest.mark.parametrize("secure", [True, False])
def test_noise_std_matches_sigma_c_over_expected_cohort(secure):
    # Zero updates: what changes the model is the noise alone, divided by q·N.
    dp = DPConfig(noise_multiplier=1.3, clip=0.8)
    params = ItemParams(np.zeros((300, 2), np.float32), np.zeros(300, np.float32))  # 900 draws
    new = server_update_arrays(params.to_arrays(), [np.zeros((300, 2)), np.zeros(300)], 0,
                               optimizer=ServerOptimizer("sgd", 1.0), dp=dp, expected_cohort=0.1 * 500,
                               noise=GaussianNoise(None if secure else 3))
    draws = np.concatenate([new[0].ravel(), new[1]]).astype(np.float64)
    expected = 1.3 * 0.8 / 50
    assert abs(draws.std() - expected) / expected < 0.15
    assert abs(draws.mean()) < 4 * expected / np.sqrt(len(draws))


def test_secure_noise_is_not_reproducible_and_seeded_noise_is():
    assert not np.array_equal(GaussianNoise().normal((64,), 1.0), GaussianNoise().normal((64,), 1.0))
    a = GaussianNoise(5).for_round(3).normal((64,), 1.0)
    assert np.array_equal(a, GaussianNoise(5).for_round(3).normal((64,), 1.0))
    assert not np.array_equal(a, GaussianNoise(5).for_round(4).normal((64,), 1.0))


def test_an_update_above_c_is_clipped_on_the_client_before_sending(block_csv):
    from client.app import RecClient

    cfg = RunConfig.from_flat({"data.source": str(block_csv), "model.dim": 8})
    sets = EvalSets.from_split(split_interactions(load_interactions(str(block_csv)), "random", seed=0))
    data = ClientData.from_sets(0, np.array([0]), sets)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    client = RecClient(cfg, data, ctx, model=MFModel(cfg.model, sets.n_items))
    params = init_items(sets.n_items, 8, seed=0, scale=1.0)
    config = {keys.SERVER_ROUND: 1, keys.LOCAL_EPOCHS: 1, keys.CLIENT_LR: 1.0}
    raw, _, _ = client.fit(params.to_arrays(), config)
    assert global_norm(raw) > 0.5  # the unclipped update is large...
    sent, n, metrics = client.fit(params.to_arrays(), {**config, keys.CLIP_NORM: 0.5, keys.BIAS_SHARE: 0.1})
    assert global_norm(sent) <= 0.5 + 1e-6  # ...and what leaves the device is bounded
    assert n == 1 and set(metrics) == {keys.M_TRAIN_LOSS, keys.M_USERS}
    assert ctx.state.array_records[keys.STATE_USER_VECTORS]  # the user vector stays on the device


def test_budget_stops_before_the_round_that_would_exceed_it(block_csv):
    sets = EvalSets.from_split(split_interactions(load_interactions(str(block_csv)), "random", seed=0))
    cfg = RunConfig.from_flat({"data.source": str(block_csv), "fed.rounds": 50, "fed.sample-rate": 0.5,
                               "model.dim": 4, "dp.noise-multiplier": 2.0, "dp.target-epsilon": 3.0,
                               "dp.noise-seed": 0})
    result = run_inprocess(cfg, sets)
    released = len(result.rounds)
    assert 0 < released < 50
    assert result.ledger.epsilon() <= 3.0
    # one more round would have exceeded the budget
    extra = MechanismEvent(noise_multiplier=2.0, sample_rate=0.5, steps=1, sampling=Sampling.POISSON,
                           parameters=keys.ITEM_PARAM_NAMES, round=released + 1)
    assert result.ledger.would_exceed(extra, target_epsilon=3.0)


def test_epsilon_per_round_comes_from_the_ledger_and_increases(block_csv):
    sets = EvalSets.from_split(split_interactions(load_interactions(str(block_csv)), "random", seed=0))
    cfg = RunConfig.from_flat({"data.source": str(block_csv), "fed.rounds": 5, "fed.sample-rate": 0.3,
                               "model.dim": 4, "dp.noise-seed": 0})
    result = run_inprocess(cfg, sets)
    eps = [r["epsilon"] for r in result.rounds]
    assert all(b > a for a, b in zip(eps, eps[1:]))
    ledger = ledger_for("central", cfg.dp.delta)
    for r in range(1, 6):
        ledger.record(MechanismEvent(noise_multiplier=cfg.dp.noise_multiplier, sample_rate=0.3, steps=1,
                                     sampling=Sampling.POISSON,
                                     parameters=keys.ITEM_PARAM_NAMES, round=r))
    assert eps[-1] == pytest.approx(ledger.epsilon())


def test_secure_central_noise_sums_four_os_random_draws_per_coordinate(monkeypatch):
    """Issue #11 (13): the server's noise is drawn like Opacus' secure mode, as the sum of four
    CSPRNG Gaussian draws per coordinate (no single floating-point sample is released), with the
    intended standard deviation."""
    from common.privacy import dp_fedavg

    calls: list[int] = []
    real = dp_fedavg._urandom_normal
    monkeypatch.setattr(dp_fedavg, "_urandom_normal", lambda n: calls.append(n) or real(n))
    z = dp_fedavg.GaussianNoise(None).normal((200, 250), 2.0)
    assert calls == [50_000] * dp_fedavg.SECURE_DRAWS == [50_000] * 4
    assert z.shape == (200, 250)
    assert np.std(z) == pytest.approx(2.0, rel=0.02) and abs(np.mean(z)) < 0.03
    kurtosis = float(np.mean((z / np.std(z)) ** 4))
    assert 2.9 < kurtosis < 3.1  # Gaussian tails
    assert not np.array_equal(z, dp_fedavg.GaussianNoise(None).normal((200, 250), 2.0))
