"""Federated evaluation (each client ranks its own items, the server averages) equals a central
evaluation of the same user and item vectors."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import ModelConfig
from common.data import load_interactions
from common.data.splits import split_interactions
from common.device import client_evaluate, reconstruct_users
from common.evaluation import EvalSets, evaluate_ranking
from common.models import ClientData, UserData
from common.models.mf.params import init_items
from common.rounds import ServerOptimizer


@pytest.mark.parametrize("phase", ["valid", "test"])
def test_federated_evaluation_equals_central(block_csv, phase):
    split = split_interactions(load_interactions(str(block_csv)), "random", seed=1)
    sets = EvalSets.from_split(split)
    model = ModelConfig(dim=6, user_reg=1.0)
    params = init_items(split.n_items, 6, seed=3, scale=0.5)
    users = [UserData(sets.train[u], sets.train_ratings[u]) for u in range(split.n_users)]
    vectors = reconstruct_users(params, users, model, seed=0)
    central = evaluate_ranking(lambda idx: vectors[idx] @ params.embeddings.T + params.bias, sets, phase)

    totals: dict[str, float] = {}
    n = 0
    for u in range(split.n_users):
        res = client_evaluate(params, ClientData.from_sets(u, np.array([u]), sets), model=model, phase=phase, seed=0)
        n += res.pop("users")
        for k, v in res.items():
            totals[k] = totals.get(k, 0.0) + v
    assert n == central["users"]
    for key in ("ndcg@10", "recall@10", "hr@10", "mrr@10", "precision@10", "ndcg@20", "recall@20"):
        assert totals[key] / n == pytest.approx(central[key], abs=1e-9), key


def test_silo_client_evaluation_sums_its_users(block_csv):
    split = split_interactions(load_interactions(str(block_csv)), "random", seed=1)
    sets = EvalSets.from_split(split)
    model = ModelConfig(dim=6, user_reg=1.0)
    params = init_items(split.n_items, 6, seed=3, scale=0.5)
    one = [client_evaluate(params, ClientData.from_sets(u, np.array([u]), sets), model=model, phase="test", seed=0)
           for u in range(4)]
    silo = client_evaluate(params, ClientData.from_sets(0, np.arange(4), sets), model=model, phase="test", seed=0)
    assert silo["users"] == sum(o["users"] for o in one)
    assert silo["ndcg@10"] == pytest.approx(sum(o["ndcg@10"] for o in one))


def test_server_optimizer_state_round_trip_continues_identically():
    rng = np.random.default_rng(0)
    params = [rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=5).astype(np.float32)]
    updates = [[rng.normal(size=(5, 3)), rng.normal(size=5)] for _ in range(4)]
    a = ServerOptimizer("adam", 0.1, weight_decay=0.01)
    pa = params
    for u in updates:
        pa = a.step(pa, u)
    b = ServerOptimizer("adam", 0.1, weight_decay=0.01)
    pb = params
    for u in updates[:2]:
        pb = b.step(pb, u)
    c = ServerOptimizer("adam", 0.1, weight_decay=0.01)
    c.load_state_dict(b.state_dict())
    for u in updates[2:]:
        pb = c.step(pb, u)
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(x, y)
