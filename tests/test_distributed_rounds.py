"""Distributed DP in rounds (dp.mode = distributed, common/ddp_round.py): the server never holds an
un-noised sum, every round is charged as it ran, a device refuses less noise than its floor."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common import keys
from common.config import RunConfig
from common.ddp_round import RoundMechanism
from common.device import protect
from common.inprocess import run_inprocess
from common.models import ClientData, build_model
from common.privacy.ddp_event import DistributedDpEvent
from common.privacy.device import DevicePolicy, PolicyRefusal, protection_for
from common.privacy.distributed import modular_sum
from common.privacy.dp_fedavg import GaussianNoise
from common.privacy.ledger import MechanismEvent
from common.rounds import RoundEngine
from tests.conftest import zipf_sets

BASE = {"model.dim": 8, "fed.sample-rate": 0.5, "fed.rounds": 3, "dp.mode": "distributed", "fed.sampling-seed": 0,
        "secagg.enabled": False}


def _cfg(**flat) -> RunConfig:
    return RunConfig.from_flat({**BASE, **flat})


def _round(cfg: RunConfig, sets, rnd: int = 1):
    """One round up to what SecAgg+ would reveal: the engine, the devices' clipped updates in
    plaintext (what the test knows and the server must not), and the modular sum of their encodings."""
    model = build_model(cfg.model, n_items=sets.n_items, seed=cfg.seed, texts=lambda: ())
    engine = RoundEngine(cfg, model)
    clients = [ClientData.from_sets(u, np.array([u]), sets) for u in range(len(sets.train))]
    cohort = engine.cohort(range(len(clients)), rnd)
    instruction = engine.instruction(rnd, secure_aggregation=True)
    protection = protection_for(DevicePolicy.for_run(cfg), instruction)
    shapes = [a.shape for a in model.arrays(engine.params)]
    clipped, encoded = [], []
    for cid in cohort:
        step = model.train(engine.params, engine.context, clients[cid], epochs=1, lr=cfg.fed.client_lr, seed=0,
                           server_round=rnd)
        clipped.append(np.concatenate([a.ravel() for a in model.clip(list(step.update), protection.clip,
                                                                     protection.bias_share)]))
        encoded.append(protect(model, step.update, shapes, protection, noise=GaussianNoise(None))[0])
    return engine, clipped, encoded


def test_the_server_never_holds_an_unnoised_sum():
    # What the server unmasks, decoded, minus the true sum of the clipped updates: the devices' noise
    # shares, with the planned spread γ·√(m·σ²) per coordinate (the rotation is orthogonal).
    cfg = _cfg()
    sets = zipf_sets()
    engine, clipped, encoded = _round(cfg, sets)
    params = engine.mechanism.params
    total, problem = engine.distributed_total(modular_sum(encoded, params), len(encoded))
    assert problem is None
    residual = np.concatenate([a.ravel() for a in total]) - np.sum(clipped, axis=0)
    planned = params.gamma * math.sqrt(len(encoded) * params.local_variance)
    assert params.min_survivors == len(encoded)  # dropout tolerance 0: sized for the whole cohort
    assert 0.95 * planned < float(np.std(residual)) < 1.06 * planned
    assert abs(float(np.mean(residual))) < 0.1 * planned
    # The same check fails on a build whose devices skip their shares: it can tell.
    mech = engine.mechanism
    bare = [mech.encode(x, add_noise=False) for x in clipped]
    unnoised = np.concatenate([a.ravel() for a in engine.distributed_total(modular_sum(bare, params), len(bare))[0]])
    assert float(np.std(unnoised - np.sum(clipped, axis=0))) < 0.01 * planned


def test_fewer_survivors_than_the_round_was_sized_for_release_only_the_servers_noise():
    cfg = _cfg(**{"dp.dropout-tolerance": 0.2})
    engine, _, encoded = _round(cfg, zipf_sets())
    m = engine.mechanism.params.min_survivors
    assert m == math.ceil(len(encoded) * 0.8)
    assert engine.distributed_total(modular_sum(encoded[:m], engine.mechanism.params), m)[1] is None
    total, problem = engine.distributed_total(modular_sum(encoded[:m - 1], engine.mechanism.params), m - 1)
    assert total is None and "survivors" in problem
    before = [a.copy() for a in engine.model.arrays(engine.params)]
    engine.release(None, 0, 1, population=240)
    event = engine.ledger.events[-1]
    assert isinstance(event, MechanismEvent)  # the server's own Gaussian noise, charged as such
    assert event.noise_multiplier == pytest.approx(engine.ddp.plan.noise_multiplier)
    assert not all(np.array_equal(a, b) for a, b in zip(before, engine.model.arrays(engine.params)))


def test_a_distributed_run_is_charged_as_it_ran_and_its_plan_survives_a_checkpoint():
    cfg = _cfg(**{"dp.noise-seed": 3})
    sets = zipf_sets()
    result = run_inprocess(cfg, sets, pooled_noise=True, final_eval=False)
    events = result.ledger.events
    assert [type(e) for e in events] == [DistributedDpEvent] * 3
    assert [e.survivors for e in events] == [r["participants"] for r in result.rounds]
    released, server = result.ledger.epsilon(), result.ledger.epsilon(amplification=False)
    assert released <= cfg.dp.target_epsilon + 1e-9 and server > released  # q = 0.5: little amplification
    # Checkpoint and restore: the same plan (the field and T do not change mid-run).
    model = build_model(cfg.model, n_items=sets.n_items, seed=cfg.seed, texts=lambda: ())
    engine = RoundEngine(cfg, model)
    engine.cohort(range(len(sets.train)), 1)
    named, opt, extra = engine.state()
    restored = RoundEngine.restore(cfg, model, named, opt, json.loads(json.dumps(extra)))
    assert restored.ddp.plan == engine.ddp.plan


def test_pooled_noise_gives_the_same_spread_as_each_devices_share():
    cfg = _cfg(**{"fed.rounds": 1})
    sets = zipf_sets()
    engine, clipped, _ = _round(cfg, sets)
    from common.privacy.distributed import pooled_noise

    params = engine.mechanism.params
    mech = engine.mechanism
    bare = [mech.encode(x, add_noise=False) for x in clipped]
    pooled = modular_sum([*bare, pooled_noise(params, len(bare))], params)
    total = np.concatenate([a.ravel() for a in engine.distributed_total(pooled, len(bare))[0]])
    planned = params.gamma * math.sqrt(len(bare) * params.local_variance)
    assert 0.95 * planned < float(np.std(total - np.sum(clipped, axis=0))) < 1.06 * planned


class TestTheDevicesFloor:
    def _instruction(self, **flat):
        cfg = _cfg(**flat)
        engine, _, _ = _round(cfg, zipf_sets())
        return engine, engine.instruction(1, secure_aggregation=True)

    def test_a_device_refuses_less_noise_than_its_floor(self):
        engine, ins = self._instruction()
        z = engine.mechanism.noise_multiplier
        assert protection_for(DevicePolicy(distributed_noise=z * 0.99), ins).distributed is not None
        with pytest.raises(PolicyRefusal, match="below this device's floor"):
            protection_for(DevicePolicy(distributed_noise=z * 1.01), ins)

    def test_a_device_with_a_distributed_floor_refuses_central_dp(self):
        _, ins = self._instruction(**{"dp.mode": "central"})
        with pytest.raises(PolicyRefusal, match="only under distributed DP"):
            protection_for(DevicePolicy(distributed_noise=0.5), ins)

    def test_a_forged_or_replayed_mechanism_is_refused(self):
        engine, ins = self._instruction()
        for bad in ("{", json.dumps({"v": 2}), json.dumps({**json.loads(ins[keys.DISTRIBUTED]), "extra": 1}),
                    json.dumps({**json.loads(ins[keys.DISTRIBUTED]), "local_variance": 0})):
            with pytest.raises(PolicyRefusal, match="distributed-DP instruction"):
                protection_for(DevicePolicy(), {**ins, keys.DISTRIBUTED: bad})
        with pytest.raises(PolicyRefusal, match="another round"):
            protection_for(DevicePolicy(), {**ins, keys.SERVER_ROUND: 2})
        with pytest.raises(PolicyRefusal, match="local and distributed"):
            protection_for(DevicePolicy(), {**ins, keys.LOCAL_NOISE: 1.0})

    def test_a_mechanism_for_another_model_size_is_refused_by_protect(self):
        engine, ins = self._instruction()
        mech = RoundMechanism.from_json(ins[keys.DISTRIBUTED])
        assert mech.params == engine.mechanism.params
        protection = protection_for(DevicePolicy(), ins)
        arrays = engine.model.arrays(engine.params)
        with pytest.raises(ValueError, match="update refused"):
            protect(engine.model, [a[:-1] for a in arrays], [a[:-1].shape for a in arrays], protection,
                    noise=GaussianNoise(None))


def test_config_refuses_distributed_dp_without_a_budget_or_with_silos():
    with pytest.raises(ValueError, match="target-epsilon"):
        _cfg(**{"dp.target-epsilon": 0})
    with pytest.raises(ValueError, match="partition"):
        _cfg(**{"fed.partition": "silo"})
    with pytest.raises(ValueError, match="dp.bits"):
        _cfg(**{"dp.bits": 40})


@pytest.mark.slow
def test_distributed_dp_through_flower_secagg_equals_the_inprocess_runner(block_csv, tmp_path):
    # The real path: Ray, Flower's SecAgg+ (its quantizer carrying field elements one level each),
    # every device drawing its own seeded discrete noise share. The field arithmetic is exact, so
    # the released model equals the in-process runner's bit for bit, and each round is charged as it ran.
    from common.data import load_interactions
    from common.data.splits import split_interactions
    from common.evaluation import EvalSets
    from common.serialization import load_arrays
    from server import simulation
    from server.run_dir import RunDir

    cfg = RunConfig.from_flat({"data.source": str(block_csv), "fed.rounds": 3, "fed.sample-rate": 0.7,
                               "fed.eval-every": 10, "model.dim": 8, "fed.server-lr": 0.05, "dp.mode": "distributed",
                               "dp.noise-seed": 7, "dp.bits": 16, "fed.sampling-seed": 0, "secagg.enabled": True})
    run_dir = RunDir.create(tmp_path, cfg)
    simulation.run(cfg, run_dir, progress=False)
    fits = [r for r in run_dir.rounds() if r["kind"] == "fit"]
    assert len(fits) == 3 and not any(r.get("refused") or r.get("abandoned") for r in fits)
    assert all("train_loss" not in r for r in fits)  # no plaintext loss leaves a device
    flower = load_arrays(run_dir.path / "model.safetensors")
    sets = EvalSets.from_split(split_interactions(load_interactions(str(block_csv)), "random", seed=0))
    local = run_inprocess(cfg, sets, secure_aggregation=True)
    np.testing.assert_array_equal(flower["item_embeddings"], local.params.embeddings)
    np.testing.assert_array_equal(flower["item_bias"], local.params.bias)
    ledger = json.loads((run_dir.path / "ledger.json").read_text())
    assert [e.get("kind") for e in ledger["ledger"]["events"]] == ["ddgauss"] * 3
    assert [r["epsilon"] for r in fits] == [r["epsilon"] for r in local.rounds]
    # The report gives both ε (RDP only) and says whom each holds against.
    report = json.loads((run_dir.path / "privacy_report.json").read_text())
    assert report["epsilon"]["pld"] is None
    assert report["epsilon_without_amplification"]["rdp"] > report["epsilon"]["rdp"]
    assert "against the server" in report["guarantee"] and "distributed DP" in report["mechanism"]
    assert "already noised" in report["claims"]["server_sees"]
