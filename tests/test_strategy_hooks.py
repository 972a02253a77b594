"""The strategy's hooks with a fake grid and fake clients (no Ray): what one malicious client
can and cannot make the server accept (issue #12, findings 2, 3 and 4)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message
from flwr.common import EvaluateRes, FitRes, GetPropertiesRes, Status, ndarrays_to_parameters
from flwr.common.typing import Code
from flwr.compat.common import recorddict_compat

from common import keys
from common.config import RunConfig
from common.models.mf.model import MFModel
from common.privacy.dp_fedavg import clip_grouped
from common.rounds import RoundEngine
from server.run_dir import RunDir
from server.strategy import FedRecStrategy

N_ITEMS, DIM = 30, 4


class Proxy:
    def __init__(self, node_id: int) -> None:
        self.node_id, self.cid = node_id, str(node_id)


class Manager:
    def __init__(self, proxies: list[Proxy]) -> None:
        self.proxies = {p.cid: p for p in proxies}

    def all(self):
        return self.proxies

    def wait_for(self, n, timeout):
        return True


class Grid:
    """Answers identity queries with each node's scripted properties."""

    def __init__(self, properties: dict[int, dict]) -> None:
        self.properties = properties

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            res = GetPropertiesRes(Status(Code.OK, ""), self.properties[msg.metadata.dst_node_id])
            reply = Message(recorddict_compat.getpropertiesres_to_recorddict(res), reply_to=msg)
            out.append(reply)
        return out


def strategy(tmp_path, **flat) -> FedRecStrategy:
    cfg = RunConfig.from_flat({"model.dim": DIM, "dp.noise-seed": 1, "dp.target-epsilon": 0,
                               "secagg.enabled": False, **flat})
    engine = RoundEngine(cfg, MFModel(cfg.model, N_ITEMS))
    s = FedRecStrategy(cfg, RunDir.create(tmp_path, cfg), engine, grid=None)
    s.client_ids = {str(i): i for i in range(10)}
    s.node_to_client = {i: i for i in range(10)}
    s.current_round, s._row = 1, {"round": 1, "sampled": 3, "failures": 0}
    return s


def fit_results(updates: list[list[np.ndarray]]):
    return [(Proxy(i), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), 1, {})) for i, u in enumerate(updates)]


def honest(seed: int, clip: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = [rng.standard_normal((N_ITEMS, DIM)), rng.standard_normal(N_ITEMS)]
    return clip_grouped(raw, clip, 0.05)


@pytest.mark.parametrize("attack", ["every value at C", "bias group at C", "joint norm 2C"])
def test_plaintext_updates_above_the_per_group_l2_bound_are_refused(tmp_path, attack):
    """Every value within ±C passed the old per-value check (an update of norm ≈ √d·C ≫ C)."""
    s = strategy(tmp_path)  # central DP, no SecAgg+: the server sees each update
    bad = {"every value at C": [np.ones((N_ITEMS, DIM)), np.ones(N_ITEMS)],
           "bias group at C": [np.zeros((N_ITEMS, DIM)), np.full(N_ITEMS, 1 / np.sqrt(N_ITEMS))],
           "joint norm 2C": [2 * a for a in honest(9)]}[attack]
    s.aggregate_fit(1, fit_results([honest(1), honest(2), bad]), [])
    assert s._row["participants"] == 2 and s._row["failures"] == 1
    assert "L2 norm" in s.failures[-1][2] and s.failures[-1][1] == 2


def test_without_dp_one_huge_update_is_still_refused(tmp_path):
    """--no-dp --no-secagg: one update of −1e30 used to move the model for 30 rounds."""
    s = strategy(tmp_path, **{"dp.enabled": False})
    before = s.engine.params.bias.copy()
    s.aggregate_fit(1, fit_results([honest(1), [np.full((N_ITEMS, DIM), -1e30), np.full(N_ITEMS, -1e30)]]), [])
    assert s._row["participants"] == 1 and "L2 norm" in s.failures[-1][2]
    assert np.max(np.abs(s.engine.params.bias - before)) < 1.0


def test_a_string_training_loss_or_silo_history_is_ignored_not_fatal(tmp_path):
    s = strategy(tmp_path)
    results = fit_results([honest(1), honest(2)])
    results[0][1].metrics.update({keys.M_TRAIN_LOSS: "lots", keys.M_SILO_SIGMA: "x"})
    results[1][1].metrics.update({keys.M_TRAIN_LOSS: 2.5})
    s.aggregate_fit(1, results, [])
    assert s._row["participants"] == 2 and s._row["train_loss"] == 2.5
    assert "silo DP-SGD history entry refused" in s.failures[-1][2]


@pytest.fixture
def task_identity(monkeypatch):
    """Flower's messages read the run id of the current task (set by the ServerApp runtime)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def test_identity_replies_are_parsed_and_a_copied_id_cannot_displace_its_owner(tmp_path, task_identity):
    s = strategy(tmp_path)
    s.client_ids, s.node_to_client = {}, {}
    s.grid._grid = Grid({10: {"client-id": 7, "users": 1}, 11: {}, 12: {"client-id": "abc"},
                   13: {"client-id": 7, "users": 1}, 14: {"client-id": 8, "users": -1}})
    proxies = s._resolve_ids(Manager([Proxy(n) for n in (10, 11, 12, 13, 14)]))
    assert [p.node_id for p in proxies] == [10]  # only the first claim of id 7 stands
    reasons = " | ".join(f[2] for f in s.failures)
    assert "identity reply refused" in reasons and "'abc'" in reasons
    assert "belongs to another connected node" in reasons and "users must be ≥ 0" in reasons
    assert s.client_to_node[7] == 10


def _eval(users: int, ndcg: float):
    return EvaluateRes(Status(Code.OK, ""), 0.0, users, {"ndcg@10": ndcg, "recall@10": 0.5 * users})


def test_evaluation_sums_outside_what_a_client_holds_are_refused(tmp_path):
    s = strategy(tmp_path)
    s.client_users = {i: 1 for i in range(10)}
    results = [(Proxy(0), _eval(1, 0.4)), (Proxy(1), _eval(1, 90909091.0)), (Proxy(2), _eval(5, 0.5)),
               (Proxy(3), _eval(1, float("nan"))), (Proxy(4), _eval(1, 0.2))]
    s.aggregate_evaluate(20, results, [])
    row = [r for r in s.run_dir.rounds() if r["kind"] == "eval"][-1]
    assert row["users"] == 2 and row["ndcg@10"] == pytest.approx(0.3) and row["failures"] == 3
