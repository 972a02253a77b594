"""A real Flower simulation (Ray) of a tiny federation: run directory, resume, failures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Message

from common.config import RunConfig
from common.serialization import load_arrays
from server import simulation
from server.run_dir import ConfigMismatchError, RunDir

pytestmark = pytest.mark.slow


def tiny_config(csv, **flat) -> RunConfig:
    base = {"data.source": str(csv), "fed.rounds": 3, "fed.sample-rate": 0.8, "fed.eval-every": 2,
            "fed.eval-clients": 0, "fed.timeout": 300.0, "model.dim": 8, "fed.server-lr": 0.05,
            "dp.noise-seed": 0, "fed.sampling-seed": 0,  # DP and SecAgg+ on; seeded noise and cohorts,
            "dp.target-epsilon": 0.0}  # no budget cap
    return RunConfig.from_flat({**base, **flat})


def run(cfg: RunConfig, root, **kw):
    run_dir = RunDir.create(root, cfg)
    result = simulation.run(cfg, run_dir, progress=False, **kw)
    return run_dir, result


def test_tiny_federation_writes_a_complete_run_directory(block_csv, tmp_path):
    cfg = tiny_config(block_csv)
    run_dir, result = run(cfg, tmp_path / "runs")
    assert result["num_clients"] == 12
    rows = run_dir.rounds()
    fits = [r for r in rows if r["kind"] == "fit"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["round"] for r in fits] == [1, 2, 3]
    assert all(r["participants"] == r["sampled"] > 0 and r["failures"] == 0 for r in fits)
    assert [e["phase"] for e in evals] == ["valid", "test"]
    assert evals[-1]["users"] > 0 and 0 <= evals[-1]["ndcg@10"] <= 1
    model = load_arrays(run_dir.path / "model.safetensors")
    assert model["item_embeddings"].shape == (48, 8) and model["item_bias"].shape == (48,)
    assert RunDir(run_dir.path).config() == cfg
    assert "ndcg@10" in simulation.summarize(run_dir, result)


def test_resume_gives_the_same_model_as_an_uninterrupted_run(block_csv, tmp_path):
    # SecAgg+ quantizes with random rounding, so exact equality is checked without it.
    cfg = tiny_config(block_csv, **{"fed.rounds": 4, "secagg.enabled": False})
    full, _ = run(cfg, tmp_path / "a")
    interrupted, _ = run(cfg, tmp_path / "b", stop_after=2)
    assert not (interrupted.path / "model.safetensors").exists()
    assert max(r["round"] for r in interrupted.rounds()) == 2
    RunDir(interrupted.path).check_resume(cfg)
    simulation.run(cfg, interrupted, progress=False)
    a = load_arrays(full.path / "model.safetensors")
    b = load_arrays(interrupted.path / "model.safetensors")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert [r["round"] for r in interrupted.rounds() if r["kind"] == "fit"] == [1, 2, 3, 4]


def test_resume_with_a_changed_config_is_refused(block_csv, tmp_path):
    cfg = tiny_config(block_csv)
    run_dir = RunDir.create(tmp_path, cfg)
    with pytest.raises(ConfigMismatchError, match=r"fed.server-lr: 0.05 -> 0.1"):
        run_dir.check_resume(cfg.replace(**{"fed.server-lr": 0.1}))


def _fail_client_3(msg: Message, context, call_next):
    # A device that crashes while training.
    if msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 3:
        raise RuntimeError("simulated device crash")
    return call_next(msg, context)


def test_a_failing_client_is_counted_and_the_round_goes_on(block_csv, tmp_path, monkeypatch, caplog):
    from client import app as client_app

    # The plain path; SecAgg+ dropouts are covered in tests/test_secagg.py.
    cfg = tiny_config(block_csv, **{"fed.rounds": 2, "fed.sample-rate": 1.0, "secagg.enabled": False})
    original = client_app.build_client_app
    monkeypatch.setattr(client_app, "build_client_app", lambda c: original(c, mods=[_fail_client_3]))
    with caplog.at_level("WARNING", logger="server.strategy"):
        run_dir, _ = run(cfg, tmp_path / "runs")
    fits = [r for r in run_dir.rounds() if r["kind"] == "fit"]
    assert [r["failures"] for r in fits] == [1, 1]
    assert [r["participants"] for r in fits] == [11, 11]
    assert "client 3 failed" in caplog.text


def test_silo_dp_sgd_composes_epsilon_across_rounds_and_across_a_resume(tmp_path):
    """Each silo's user-level DP-SGD ε composes over rounds (the accountant history is restored
    every round) and over a resume: the server keeps the histories with its checkpoint, so a
    resumed run (fresh client state) never reports a smaller ε (issue #11, item 6)."""
    from tests.conftest import write_block_csv

    csv = write_block_csv(tmp_path / "r.csv", n_users=30)
    cfg = tiny_config(csv, **{"fed.rounds": 3, "fed.partition": "silo", "fed.num-silos": 3,
                              "fed.sample-rate": 1.0, "dp.enabled": False, "dp.silo-dp-sgd": True,
                              "dp.silo-sample-rate": 0.5, "secagg.enabled": False})
    run_dir, _ = run(cfg, tmp_path / "runs", stop_after=1)
    one = json.loads((run_dir.path / "client_epsilons.json").read_text())
    assert set(one) == {"0", "1", "2"}
    simulation.run(cfg, run_dir, progress=False, stop_after=2)  # a resume: every client starts without state
    two = json.loads((run_dir.path / "client_epsilons.json").read_text())
    simulation.run(cfg, run_dir, progress=False)
    three = json.loads((run_dir.path / "client_epsilons.json").read_text())
    # two rounds cost more than one, three more than two, although each resume restarted the clients
    assert all(one[k] * 1.1 < two[k] < three[k] for k in one)
    from common.silo_dp import ledger_from_history

    history = RunDir(run_dir.path).load_checkpoint()[3]["silo_histories"]
    assert {k: len(v) for k, v in history.items()} == {"0": 3, "1": 3, "2": 3}
    assert three["0"] == ledger_from_history([tuple(e) for e in history["0"]], delta=cfg.dp.silo_delta).epsilon()
