"""The in-process runner is the same algorithm as the Flower simulation, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import RunConfig
from common.data import load_interactions
from common.data.splits import split_interactions
from common.evaluation import EvalSets
from common.inprocess import run_inprocess
from common.serialization import load_arrays
from server import simulation
from server.run_dir import RunDir


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["off", "central", "local"])
def test_inprocess_equals_flower_simulation(block_csv, tmp_path, mode):
    # SecAgg+ off: its quantization (and its clipping without DP) is not part of the in-process runner.
    # local: the devices' seeded noise (per round and client) is the same draw in both runners.
    dp = mode != "off"
    cfg = RunConfig.from_flat({"data.source": str(block_csv), "fed.rounds": 3, "fed.sample-rate": 0.7,
                               "fed.eval-every": 10, "model.dim": 8, "fed.server-lr": 0.05,
                               "dp.enabled": dp, "dp.mode": "local" if mode == "local" else "central",
                               "dp.noise-seed": 7, "dp.noise-multiplier": 0.5, "dp.target-epsilon": 0,
                               "fed.sampling-seed": 0, "secagg.enabled": False})
    run_dir = RunDir.create(tmp_path, cfg)
    simulation.run(cfg, run_dir, progress=False)
    flower = load_arrays(run_dir.path / "model.safetensors")
    sets = EvalSets.from_split(split_interactions(load_interactions(str(block_csv)), "random", seed=0))
    local = run_inprocess(cfg, sets)
    np.testing.assert_array_equal(flower["item_embeddings"], local.params.embeddings)
    np.testing.assert_array_equal(flower["item_bias"], local.params.bias)
    final = [r for r in run_dir.rounds() if r["kind"] == "eval"][-1]
    assert final["ndcg@10"] == pytest.approx(local.evals[-1]["ndcg@10"], abs=1e-12)
    if mode != "off":
        assert [r["epsilon"] for r in run_dir.rounds() if r["kind"] == "fit"] == [r["epsilon"] for r in local.rounds]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["off", "central", "local"])
def test_inprocess_hybrid_equals_flower_simulation(block_csv, tmp_path, mode):
    """The hybrid model (free part + head over frozen MiniLM embeddings): same model, text
    vectors, ledger and final metrics through Flower as in one process."""
    import torch

    from common.data.texts import item_texts

    torch.set_num_threads(1)  # as in every simulated client
    cfg = RunConfig.from_flat({"data.source": str(block_csv), "fed.rounds": 2, "fed.sample-rate": 0.7,
                               "fed.eval-every": 10, "model.dim": 8, "fed.server-lr": 0.05, "model.kind": "hybrid",
                               "model.text-negatives": 8, "dp.enabled": mode != "off",
                               "dp.mode": "local" if mode == "local" else "central", "dp.noise-seed": 7,
                               "dp.noise-multiplier": 0.5, "dp.target-epsilon": 0, "fed.sampling-seed": 0,
                               "secagg.enabled": False})
    run_dir = RunDir.create(tmp_path, cfg)
    simulation.run(cfg, run_dir, progress=False)
    flower = load_arrays(run_dir.path / "model.safetensors")
    sets = EvalSets.from_split(split_interactions(load_interactions(str(block_csv)), "random", seed=0))
    local = run_inprocess(cfg, sets, texts=item_texts(cfg.data))
    assert set(flower) == set(local.params.names())
    for name, array in local.params.named_arrays().items():
        np.testing.assert_array_equal(flower[name], array, err_msg=name)
    final = [r for r in run_dir.rounds() if r["kind"] == "eval"][-1]
    assert final["ndcg@10"] == pytest.approx(local.evals[-1]["ndcg@10"], abs=1e-12)
    if mode != "off":
        assert [r["epsilon"] for r in run_dir.rounds() if r["kind"] == "fit"] == [r["epsilon"] for r in local.rounds]
