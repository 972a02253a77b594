"""The final test on a secret random sample of clients (issue 17: 100,000 clients): the sample,
its 95% confidence intervals, and every place that prints the final test saying it was sampled.
The strategy is the real one, driven with real EvaluateRes objects (no Ray) except in the one
slow end-to-end test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.common import EvaluateRes, Parameters, Status
from flwr.common.typing import Code

from common.config import RunConfig
from common.metrics import ratio_mean_ci95
from common.models.mf.model import MFModel
from common.rounds import RoundEngine
from common.sampling import uniform_subset
from server import simulation
from server.report import write_report
from server.run_dir import RunDir
from server.strategy import FedRecStrategy
from tests.test_strategy_hooks import Manager, Proxy

N_ITEMS, DIM, ROUNDS = 30, 4, 5
NAMES = ("ndcg@10", "recall@10")




def strategy(tmp_path, population: int = 100, users: int = 1, **flat) -> tuple[FedRecStrategy, Manager]:
    """A strategy whose ``population`` clients (ids 0.., node ids 1000 + id) are already known."""
    cfg = RunConfig.from_flat({"model.dim": DIM, "dp.noise-seed": 1, "dp.target-epsilon": 0, "secagg.enabled": False,
                               "fed.rounds": ROUNDS, "fed.eval-every": 1, **flat})
    s = FedRecStrategy(cfg, RunDir.create(tmp_path / f"run{len(list(tmp_path.iterdir()))}", cfg),
                       RoundEngine(cfg, MFModel(cfg.model, N_ITEMS)), grid=None)
    proxies = [Proxy(1000 + c) for c in range(population)]
    s.client_ids = {p.cid: c for c, p in enumerate(proxies)}
    s.node_to_client = {p.node_id: c for c, p in enumerate(proxies)}
    s.client_users = {c: users for c in range(population)}
    return s, Manager(proxies)


def evaluated(s: FedRecStrategy, manager: Manager, server_round: int = ROUNDS) -> list[int]:
    """The client ids configure_evaluate sends the model to."""
    pairs = s.configure_evaluate(server_round, Parameters([], ""), manager)
    return [s.client_ids[p.cid] for p, _ in pairs]


def res(users: int, **sums: float) -> EvaluateRes:
    return EvaluateRes(Status(Code.OK, ""), 0.0, users, dict(sums))


def eval_row(s: FedRecStrategy) -> dict:
    return [r for r in s.run_dir.rounds() if r["kind"] == "eval"][-1]


# ---------------------------------------------------------------- the sample
def test_uniform_subset_is_the_right_size_without_repeats_and_secret_unless_seeded():
    ids = list(range(5000, 6000))
    a, b = uniform_subset(ids, 100, seed=None), uniform_subset(ids, 100, seed=None)
    for draw in (a, b):
        assert len(draw) == len(set(draw)) == 100 and set(draw) <= set(ids) and draw == sorted(draw)
    assert a != b  # secret: two draws from the OS CSPRNG (equal with probability 1 / C(1000, 100))
    assert uniform_subset(ids, 100, seed=7) == uniform_subset(reversed(ids), 100, seed=7)  # order-free
    assert uniform_subset(ids, 100, seed=7) != uniform_subset(ids, 100, seed=8)
    assert uniform_subset(ids, 0, seed=None) == ids and uniform_subset(ids, 1000, seed=None) == ids
    assert uniform_subset(ids, 5000, seed=1) == ids
    with pytest.raises(ValueError, match="≥ 0"):
        uniform_subset(ids, -1, seed=None)


def test_the_secret_sample_is_uniform():
    """Every client is drawn with probability n/N: 4,000 draws of 10 of 20, each client ~2,000 times."""
    counts = np.zeros(20)
    for _ in range(4000):
        counts[uniform_subset(range(20), 10, seed=None)] += 1
    assert np.all(np.abs(counts - 2000) < 5 * math.sqrt(4000 * 0.25))  # 5 binomial standard deviations


def test_the_final_test_evaluates_a_sample_of_the_known_clients(tmp_path):
    s, manager = strategy(tmp_path, **{"fed.test-clients": 20, "fed.eval-clients": 30})
    chosen = evaluated(s, manager)
    assert len(chosen) == len(set(chosen)) == 20 and set(chosen) <= set(range(100))
    assert s._test_sample == {"sampled_clients": 20, "population": 100, "secret": True}
    assert len(evaluated(s, manager, server_round=1)) == 30  # validation: its own seeded subset, unchanged
    other, manager2 = strategy(tmp_path, **{"fed.test-clients": 20})
    assert evaluated(other, manager2) != chosen  # secret: another strategy draws another sample


def test_a_sampling_seed_makes_the_test_sample_reproducible(tmp_path):
    draws = []
    for _ in range(2):
        s, manager = strategy(tmp_path, **{"fed.test-clients": 20, "fed.sampling-seed": 3})
        draws.append(evaluated(s, manager))
        assert s._test_sample["secret"] is False
    assert draws[0] == draws[1] and len(draws[0]) == 20
    s, manager = strategy(tmp_path, **{"fed.test-clients": 20, "fed.sampling-seed": 4})
    assert evaluated(s, manager) != draws[0]


@pytest.mark.parametrize("n", [0, 100, 250])
def test_without_a_proper_sample_the_test_evaluates_everyone(tmp_path, n):
    s, manager = strategy(tmp_path, **{"fed.test-clients": n})
    assert evaluated(s, manager) == list(range(100)) and s._test_sample is None


# ---------------------------------------------------------------- the confidence interval
def test_ci_for_one_user_per_client_is_the_plain_mean_interval():
    y = [0.0, 0.5, 1.0, 0.25, 0.75, 0.1]
    n, big_n = len(y), 40
    mean, half = ratio_mean_ci95(y, [1] * n, big_n)
    s = float(np.std(y, ddof=1))
    assert mean == pytest.approx(np.mean(y))
    assert half == pytest.approx(1.96 * s / math.sqrt(n) * math.sqrt(1 - n / big_n), rel=1e-4)


def test_ci_of_the_ratio_estimator_by_hand():
    sums, users, big_n = [1.2, 0.0, 3.5, 0.9, 2.0], [3, 1, 5, 2, 4], 50
    n = len(sums)
    r = sum(sums) / sum(users)  # 7.6 / 15
    xbar = sum(users) / n  # 3
    s2 = sum((y - r * x) ** 2 for y, x in zip(sums, users)) / (n - 1)
    want = 1.96 * math.sqrt((1 - n / big_n) * s2 / (n * xbar**2))
    mean, half = ratio_mean_ci95(sums, users, big_n)
    assert mean == pytest.approx(7.6 / 15) and half == pytest.approx(want, rel=1e-4)


def test_ci_edges():
    assert ratio_mean_ci95([0.2, 0.9, 0.4], [1, 1, 1], 3)[1] == 0.0  # n = N: exact, width 0
    assert ratio_mean_ci95([0.2, 0.9, 0.4], [1, 1, 1], 10**9)[1] > 0
    assert ratio_mean_ci95([0.2], [1], 10) == (0.2, None)  # one client: no variance to estimate
    with pytest.raises(ValueError):
        ratio_mean_ci95([0.0, 0.0], [0, 0], 10)
    with pytest.raises(ValueError):
        ratio_mean_ci95([0.1, 0.2], [1, 1], 1)


def test_a_sampled_test_logs_its_sample_and_a_ci_per_metric(tmp_path):
    s, manager = strategy(tmp_path, population=50, users=3, **{"fed.test-clients": 5})
    proxies = [p for p, _ in s.configure_evaluate(ROUNDS, Parameters([], ""), manager)]
    users, ndcg, recall = [3, 1, 0, 2, 3], [1.2, 0.3, 0.0, 0.9, 2.0], [2.0, 1.0, 0.0, 1.5, 0.5]
    results = [(p, res(u, **{"ndcg@10": a, "recall@10": b})) for p, u, a, b in zip(proxies, users, ndcg, recall)]
    _, metrics = s.aggregate_evaluate(ROUNDS, results, [])
    row = eval_row(s)
    assert row["phase"] == "test" and row["sampled"] is True and row["secret"] is True
    assert (row["sampled_clients"], row["population"], row["users"]) == (5, 50, 9)
    for name, sums in (("ndcg@10", ndcg), ("recall@10", recall)):
        assert row[name] == pytest.approx(sum(sums) / 9)
        assert row[f"{name}_ci95"] == pytest.approx(ratio_mean_ci95(sums, users, 50)[1]) and row[f"{name}_ci95"] > 0
    assert metrics["ndcg@10_ci95"] == row["ndcg@10_ci95"]
    assert "hr@10_ci95" in row  # every ranking metric, also those a client did not send (sum 0)


def test_an_exact_test_and_validation_carry_no_ci(tmp_path):
    s, manager = strategy(tmp_path, population=6, **{"fed.test-clients": 0})
    proxies = [p for p, _ in s.configure_evaluate(ROUNDS, Parameters([], ""), manager)]
    s.aggregate_evaluate(ROUNDS, [(p, res(1, **{"ndcg@10": 0.1 * i})) for i, p in enumerate(proxies)], [])
    row = eval_row(s)
    assert row["phase"] == "test" and len(proxies) == 6
    assert "sampled" not in row and not any(k.endswith("_ci95") for k in row)
    s, manager = strategy(tmp_path, population=6, **{"fed.test-clients": 3, "fed.eval-clients": 3})
    proxies = [p for p, _ in s.configure_evaluate(1, Parameters([], ""), manager)]
    s.aggregate_evaluate(1, [(p, res(1, **{"ndcg@10": 0.5})) for p in proxies], [])
    row = eval_row(s)
    assert row["phase"] == "valid" and "sampled" not in row and not any(k.endswith("_ci95") for k in row)


def test_the_evaluation_does_not_depend_on_the_order_replies_arrive(tmp_path):
    """Replies arrive in any order and a float sum depends on its order: the strategy sums in
    client-id order (a flwr run and a simulate.py run of one seeded config differed in the last
    bit of ndcg@20 before)."""
    rows = []
    for order in (1, -1):
        s, manager = strategy(tmp_path, population=40, **{"fed.test-clients": 0})
        proxies = [p for p, _ in s.configure_evaluate(ROUNDS, Parameters([], ""), manager)]
        values = np.random.default_rng(0).random(40)  # their float sum differs with the order
        results = [(p, res(1, **{"ndcg@10": float(v)})) for p, v in zip(proxies, values)]
        s.aggregate_evaluate(ROUNDS, results[::order], [])
        rows.append(eval_row(s))
    assert rows[0]["failures"] == 0 and rows[0]["users"] == 40 and rows[0]["ndcg@10"] == rows[1]["ndcg@10"]


# ---------------------------------------------------------------- every place that prints it
SAMPLED_ROW = {"kind": "eval", "round": ROUNDS, "phase": "test", "users": 2000, "failures": 0, "sampled": True,
               "sampled_clients": 2000, "population": 100000, "secret": True,
               **{f"{m}@{k}": 0.234 for m in ("ndcg", "recall", "hr", "mrr", "precision") for k in (10, 20)},
               **{f"{m}@{k}_ci95": 0.0061 for m in ("ndcg", "recall", "hr", "mrr", "precision") for k in (10, 20)}}


def test_the_summary_says_the_test_was_sampled(tmp_path):
    cfg = RunConfig.from_flat({"fed.rounds": ROUNDS, "fed.test-clients": 2000})
    run_dir = RunDir.create(tmp_path, cfg)
    run_dir.log_round({"kind": "fit", "round": ROUNDS, "sampled": 3, "participants": 3, "failures": 0, "seconds": 1.0})
    run_dir.log_round(SAMPLED_ROW)
    text = simulation.summarize(run_dir, {"num_clients": 100000, "wall_seconds": 1.0})
    line = "final test (2,000 of 100,000 clients sampled, secret): ndcg@10 0.2340 ± 0.0061 (95% CI)"
    assert line in text and "  recall@20        0.2340 ± 0.0061" in text
    assert line in (run_dir.path / "summary.md").read_text()
    seeded = simulation.final_lines({**SAMPLED_ROW, "secret": False, "ndcg@10_ci95": None})[0]
    assert "SEEDED" in seeded and "± n/a" in seeded


def test_the_summary_of_an_exact_test_is_unchanged():
    row = {k: v for k, v in SAMPLED_ROW.items() if k not in ("sampled", "sampled_clients", "population", "secret")
           and not k.endswith("_ci95")}
    lines = simulation.final_lines(row)
    assert lines[0] == "final test  (2000 users, full ranking)" and lines[1] == "  ndcg@10          0.2340"
    assert not any("±" in line or "sampled" in line for line in lines)


def test_the_privacy_report_says_the_test_was_sampled(tmp_path):
    from tests.test_report import make_run

    run = make_run(tmp_path / "r")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[-1] = {**SAMPLED_ROW, "round": rows[-1]["round"]}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, md, html = (p.read_text() for p in write_report(run))
    for text in (md, html):
        assert "a random sample of 2000 of 100000 clients (secret)" in text and "0.234 ± 0.0061" in text
        assert "test (client sample)" in text
    exact = make_run(tmp_path / "e")
    _, md, html = (p.read_text() for p in write_report(exact))
    assert "±" not in md and "random sample" not in md and "client sample" not in md


# ---------------------------------------------------------------- config and flag
def test_test_clients_is_validated_and_has_a_flag():
    assert RunConfig().fed.test_clients == 0
    with pytest.raises(ValueError, match="fed.test-clients must be ≥ 0"):
        RunConfig.from_flat({"fed.test-clients": -1})
    cfg = simulation.build_config(simulation.parse_args(["--test-clients", "2000"]))
    assert cfg.fed.test_clients == 2000
    assert "--test-clients" in simulation.build_parser().format_help()


# ---------------------------------------------------------------- end to end (Ray)
@pytest.mark.slow
def test_a_simulation_with_a_sampled_test(block_csv, tmp_path):
    from tests.test_federation import run, tiny_config

    cfg = tiny_config(block_csv, **{"fed.rounds": 2, "secagg.enabled": False, "fed.test-clients": 5,
                                    "fed.sampling-seed": -1})
    run_dir, result = run(cfg, tmp_path / "runs")
    test = [r for r in run_dir.rounds() if r["kind"] == "eval" and r["phase"] == "test"][-1]
    assert (test["sampled"], test["sampled_clients"], test["population"], test["secret"]) == (True, 5, 12, True)
    assert 0 < test["users"] and test["ndcg@10_ci95"] >= 0
    assert "final test (5 of 12 clients sampled, secret): ndcg@10" in simulation.summarize(run_dir, result)
