"""Local DP (dp.mode = local): the device noises its own clipped update; accounted as such."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common import keys
from common.config import RunConfig
from common.data import load_interactions
from common.data.splits import split_interactions
from common.evaluation import EvalSets
from common.inprocess import run_inprocess
from common.models.mf.model import MFModel
from common.privacy import Accountant, Relation, Sampling, epsilon_for, plan_local_noise_multiplier
from common.privacy.dp_fedavg import (
    LOCAL_TAIL,
    GaussianNoise,
    add_local_noise,
    ledger_for,
    local_bound,
    local_noise_for,
    release_event,
)
from tests.conftest import write_block_csv


def test_local_noise_has_std_sigma_c_and_stays_in_the_bound():
    sigma, clip = 1.5, 0.8
    zero = [np.zeros((400, 16), np.float32), np.zeros(400, np.float32)]
    noised = add_local_noise(zero, noise_multiplier=sigma, clip=clip, noise=GaussianNoise(None))
    flat = np.concatenate([a.ravel() for a in noised])
    assert flat.size == 6800
    assert np.std(flat) == pytest.approx(sigma * clip, rel=0.05)
    assert abs(np.mean(flat)) < 4 * sigma * clip / np.sqrt(flat.size)
    assert np.max(np.abs(flat)) <= local_bound(sigma, clip)
    assert local_bound(sigma, clip) == pytest.approx(clip * (1 + LOCAL_TAIL * sigma))


def test_local_noise_is_clamped_to_the_bound():
    # A huge value is clamped (post-processing) so SecAgg+'s quantizer never clips anything itself.
    big = [np.full(50, 1e6, np.float32)]
    out = add_local_noise(big, noise_multiplier=0.1, clip=1.0, noise=GaussianNoise(3))
    assert np.all(out[0] == np.float32(local_bound(0.1, 1.0)))


def test_seeded_local_noise_differs_per_client_and_round_and_secure_is_not_repeatable():
    draw = [local_noise_for(5, r, c).normal((8,), 1.0) for r, c in [(1, 1), (1, 2), (2, 1)]]
    assert not np.allclose(draw[0], draw[1]) and not np.allclose(draw[0], draw[2])
    np.testing.assert_array_equal(draw[0], local_noise_for(5, 1, 1).normal((8,), 1.0))
    a, b = (local_noise_for(None, 1, 1).normal((8,), 1.0) for _ in range(2))
    assert not np.allclose(a, b)


def test_local_release_event_uses_sensitivity_2c_and_no_amplification():
    event = release_event("local", noise_multiplier=6.0, sample_rate=0.1, parameters=("item_bias",), server_round=1)
    assert event.sampling is Sampling.NONE and event.noise_multiplier == 6.0  # σ as the device drew it
    central = release_event("central", noise_multiplier=6.0, sample_rate=0.1, parameters=("item_bias",),
                            server_round=1)
    assert (central.noise_multiplier, central.sample_rate, central.sampling) == (6.0, 0.1, Sampling.POISSON)
    ledger = ledger_for("local", 1e-4)
    assert ledger.relation is Relation.REPLACE_ONE  # two updates of one device differ by up to 2C
    for r in range(1, 11):
        ledger.record(release_event("local", noise_multiplier=6.0, sample_rate=0.1, parameters=("item_bias",),
                                    server_round=r))
    assert ledger.epsilon() == pytest.approx(epsilon_for(noise_multiplier=3.0, sample_rate=1.0, delta=1e-4,
                                                         rounds=10))
    # For the same σ, local DP costs far more than central DP with sampling.
    assert ledger.epsilon() > 10 * epsilon_for(noise_multiplier=6.0, sample_rate=0.1, delta=1e-4, rounds=10)


def test_planned_local_sigma_meets_the_target_tightly():
    sigma = plan_local_noise_multiplier(target_epsilon=8.0, delta=1e-4, rounds=150)
    at = epsilon_for(noise_multiplier=sigma, sample_rate=1.0, delta=1e-4, rounds=150, relation=Relation.REPLACE_ONE)
    below = epsilon_for(noise_multiplier=sigma - 0.001, sample_rate=1.0, delta=1e-4, rounds=150,
                        relation=Relation.REPLACE_ONE)
    assert at <= 8.0 < below
    # the same as twice the add/remove σ of unsampled releases
    assert at == pytest.approx(epsilon_for(noise_multiplier=sigma / 2, sample_rate=1.0, delta=1e-4, rounds=150))


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    path = write_block_csv(tmp_path_factory.mktemp("local") / "ratings.csv", n_users=40)
    return EvalSets.from_split(split_interactions(load_interactions(str(path)), "random", seed=0))


def _cfg(**flat):
    base = {"data.source": "unused.csv", "fed.rounds": 4, "fed.sample-rate": 0.5, "model.dim": 8,
            "fed.eval-every": 100, "dp.mode": "local", "dp.noise-multiplier": 4.0, "dp.noise-seed": 3,
            "dp.target-epsilon": 0, "secagg.enabled": False}
    return RunConfig.from_flat({**base, **flat})


def test_inprocess_local_dp_charges_every_round_and_stops_before_the_budget(small_sets):
    result = run_inprocess(_cfg(), small_sets, final_eval=False)
    assert result.ledger.relation is Relation.REPLACE_ONE
    assert [r["round"] for r in result.rounds] == [1, 2, 3, 4]
    assert result.ledger.epsilon() == pytest.approx(epsilon_for(noise_multiplier=2.0, sample_rate=1.0,
                                                                delta=1e-4, rounds=4))
    # Budget: the round whose release would exceed the target is not run.
    eps3 = epsilon_for(noise_multiplier=2.0, sample_rate=1.0, delta=1e-4, rounds=3)
    capped = run_inprocess(_cfg(**{"dp.target-epsilon": eps3 + 1e-6}), small_sets, final_eval=False)
    assert len(capped.rounds) == 3 and capped.ledger.epsilon() <= eps3 + 1e-6


def test_local_dp_adds_noise_on_the_device_not_on_the_server(small_sets):
    """Same seeds, same clipping: local DP's model differs from the noiseless one by the clients'
    noise only; central DP at the same σ moves the model far less (noise σC/(qN) vs σC/√n).
    One round of plain SGD (lr 1): the model moves by exactly the aggregated mean."""
    one = {"fed.rounds": 1, "fed.server-opt": "sgd", "fed.server-lr": 1.0}
    plain = run_inprocess(_cfg(**one, **{"dp.enabled": False}), small_sets, final_eval=False).params
    local = run_inprocess(_cfg(**one), small_sets, final_eval=False).params
    central = run_inprocess(_cfg(**one, **{"dp.mode": "central"}), small_sets, final_eval=False).params
    gap_local = np.abs(local.embeddings - plain.embeddings).mean()
    gap_central = np.abs(central.embeddings - plain.embeddings).mean()
    assert gap_local > 0 and gap_central > 0
    assert gap_local > 2 * gap_central


def test_client_sends_a_noised_update_and_keeps_its_own_ledger(small_sets):
    from flwr.app import Context, RecordDict

    from client.app import RecClient
    from common.models import ClientData
    from common.models.mf.params import init_items
    from common.privacy.device import DevicePolicy

    cfg = _cfg(**{"dp.noise-seed": -1})
    data = ClientData.from_sets(0, np.array([0, 1, 2]), small_sets)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    client = RecClient(cfg, data, context, DevicePolicy.for_run(cfg), model=MFModel(cfg.model, small_sets.n_items))
    params = init_items(small_sets.n_items, 8, seed=0).to_arrays()
    config = {keys.SERVER_ROUND: 1, keys.CLIP_NORM: 1.0, keys.BIAS_SHARE: 0.05, keys.LOCAL_NOISE: 4.0}
    arrays, weight, metrics = client.fit(params, config)
    assert keys.M_TRAIN_LOSS not in metrics and metrics[keys.M_USERS] == 3  # no un-noised loss leaves
    norm = np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays))
    size = sum(a.size for a in arrays)
    assert weight == 1
    assert norm == pytest.approx(4.0 * np.sqrt(size), rel=0.1)  # noise dominates the clipped update (≤ 1)
    assert max(float(np.max(np.abs(a))) for a in arrays) <= local_bound(4.0, 1.0)
    client.fit(params, {**config, keys.SERVER_ROUND: 2})
    state = json.loads(str(context.state.config_records[keys.STATE_LOCAL_LEDGER]["json"]))
    assert [e["round"] for e in state["events"]] == [1, 2]
    assert state["relation"] == "replace-one"
    assert all(e["sampling"] == "no-amplification" and e["noise_multiplier"] == 4.0 for e in state["events"])
    # The device refuses a server that asks for less noise than the device's own floor.
    with pytest.raises(ValueError, match="below this device's"):
        client.fit(params, {**config, keys.SERVER_ROUND: 3, keys.LOCAL_NOISE: 1.0})


def test_privacy_plan_cli_local(capsys):
    from server.cli import main

    assert main(["privacy", "plan", "--target-epsilon", "8", "--delta", "1e-4", "--rounds", "150", "--local"]) == 0
    out = capsys.readouterr().out
    sigma = plan_local_noise_multiplier(target_epsilon=8.0, delta=1e-4, rounds=150)
    assert f"sigma = {sigma:.3f}" in out and "no amplification" in out
    assert epsilon_for(noise_multiplier=sigma / 2, sample_rate=1.0, delta=1e-4, rounds=150,
                       accountant=Accountant.PLD) < 8.0


def test_simulate_flags_plan_local_dp_and_turn_secagg_off():
    from common.cli import UsageError
    from server import simulation

    cfg = simulation.build_config(simulation.parse_args(["--local-dp", "--rounds", "150", "--no-secagg"]))
    assert cfg.dp.mode == "local" and not cfg.secagg.enabled
    assert cfg.dp.noise_multiplier == plan_local_noise_multiplier(target_epsilon=8.0, delta=1e-4, rounds=150)
    given = simulation.build_config(simulation.parse_args(["--local-dp", "--noise-multiplier", "20"]))
    assert (given.dp.mode, given.dp.noise_multiplier, given.secagg.enabled) == ("local", 20.0, True)
    with pytest.raises(UsageError, match="contradict"):
        simulation.build_config(simulation.parse_args(["--local-dp", "--no-dp"]))
