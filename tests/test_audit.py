"""The leakage audit (common/audit.py): its metrics, its positive control, and what DP and SecAgg hide."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import torch

from common.audit import average_ranks, leakage_audit, precision_at_k, roc_auc
from common.config import RunConfig
from common.evaluation import EvalSets
from server.cli import main
from server.run_dir import RunDir

torch.set_num_threads(1)

SMALL = {"model.dim": 8}


def uniform_sets(n_users: int = 160, n_items: int = 240, per_user: int = 20, seed: int = 0) -> EvalSets:
    """Every user rates ``per_user`` items drawn uniformly: no popularity structure, so a cohort's
    aggregate says nothing about which items one client rated beyond that client's own share."""
    rng = np.random.default_rng(seed)
    train = [np.sort(rng.choice(n_items, per_user, replace=False)).astype(np.int64) for _ in range(n_users)]
    empty = [np.zeros(0, dtype=np.int64)] * n_users
    return EvalSets(train=train, valid=empty, test=empty, train_ratings=[np.ones(per_user, np.float32)] * n_users,
                    popularity=np.bincount(np.concatenate(train), minlength=n_items), n_items=n_items)


@pytest.fixture(scope="module")
def uniform():
    return uniform_sets()


# ---------------------------------------------------------------- metrics
def brute_force_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=60).astype(float)  # many ties
    labels = rng.random(60) < 0.3
    assert roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)
    assert roc_auc(scores, np.flatnonzero(labels)) == roc_auc(scores, labels)  # indices or a mask


def test_auc_edge_cases():
    assert roc_auc([3.0, 2.0, 1.0], [0]) == 1.0
    assert roc_auc([3.0, 2.0, 1.0], [2]) == 0.0
    assert roc_auc([1.0, 1.0, 1.0], [1]) == 0.5  # all tied: chance
    assert np.isnan(roc_auc([1.0, 2.0], []))
    np.testing.assert_array_equal(average_ranks([10, 20, 10, 30]), [1.5, 3, 1.5, 4])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([np.nan, 1.0], [0])


def test_precision_at_k_counts_ties_by_expectation():
    assert precision_at_k([5.0, 4.0, 3.0, 2.0], [0, 2], 2) == 0.5
    # one slot left for three tied items, one of them positive: 1/3 of a hit in 2 slots
    assert precision_at_k([3.0, 2.0, 2.0, 2.0, 1.0], [1], 2) == pytest.approx(1 / 6)
    # equals the mean over every tie-break order
    scores, pos = np.array([3.0, 2.0, 2.0, 2.0, 1.0]), np.array([0, 3])
    hits = [np.isin(np.array([0, *order])[:3], pos).sum() / 3 for order in itertools.permutations([1, 2, 3])]
    assert precision_at_k(scores, pos, 3) == pytest.approx(np.mean(hits))


# ---------------------------------------------------------------- the audit
def test_audit_on_uniform_data(uniform):
    t0 = time.perf_counter()
    fig = leakage_audit(uniform, RunConfig.from_flat(SMALL), clients=40, seed=0)
    assert time.perf_counter() - t0 < 20
    assert fig["plaintext_auc"] > 0.95 and fig["plaintext_p@k"] > 0.9  # positive control: the attack works
    assert 0.0 <= fig["dp_only_auc"] <= 1.0  # clipping alone hides nothing (reported, ~1 in fact)
    assert fig["released_auc"] == pytest.approx(0.5, abs=0.05)
    assert fig["released_nonmember_auc"] == pytest.approx(0.5, abs=0.05)
    assert fig["secagg_auc"] > fig["secagg_nonmember_auc"]  # the noiseless sum still marks the cohort's items
    assert fig["clients"] == 40 and fig["nonmembers"] == 40 and fig["round"] == 1
    assert fig["sigma"] == RunConfig().dp.noise_multiplier and fig["clip"] == RunConfig().dp.clip
    for key, value in fig.items():
        if key.endswith(("_auc", "p@k")):
            assert 0.0 <= value <= 1.0, key
    json.dumps(fig)  # JSON-ready as it is


def test_local_dp_hides_items_only_with_enough_noise(uniform):
    loud = leakage_audit(uniform, RunConfig.from_flat({**SMALL, "dp.noise-multiplier": 20.0}), clients=30)
    quiet = leakage_audit(uniform, RunConfig.from_flat({**SMALL, "dp.noise-multiplier": 1e-4}), clients=30)
    assert loud["local_dp_auc"] == pytest.approx(0.5, abs=0.05)
    assert quiet["local_dp_auc"] > 0.95
    assert loud["plaintext_auc"] == quiet["plaintext_auc"]  # same clients, same updates


def test_audit_is_reproducible_and_checks_its_arguments(uniform):
    cfg = RunConfig.from_flat(SMALL)
    assert leakage_audit(uniform, cfg, clients=10, seed=3) == leakage_audit(uniform, cfg, clients=10, seed=3)
    with pytest.raises(ValueError, match="only 160 users"):
        leakage_audit(uniform, cfg, clients=500)


def test_audit_after_warm_up_rounds(uniform):
    fig = leakage_audit(uniform, RunConfig.from_flat({**SMALL, "fed.sample-rate": 0.2}), clients=20, rounds=3)
    assert fig["round"] == 3 and fig["plaintext_auc"] > 0.95


def test_audit_on_ml100k():
    from common.data import load_interactions
    from common.data.splits import split_interactions

    sets = EvalSets.from_split(split_interactions(load_interactions("ml-100k"), "random", seed=0))
    t0 = time.perf_counter()
    fig = leakage_audit(sets, RunConfig(), clients=30)
    assert time.perf_counter() - t0 < 20
    assert fig["plaintext_auc"] > 0.95 and fig["dp_only_auc"] > 0.95
    assert fig["local_dp_auc"] == pytest.approx(0.5, abs=0.05)
    # The aggregate reflects the cohort's popular items (so its AUC is a little above 0.5 for members
    # and non-members alike), but hardly anything about the members themselves.
    assert fig["released_auc"] == pytest.approx(0.5, abs=0.1)
    assert abs(fig["released_auc"] - fig["released_nonmember_auc"]) < 0.03


# ---------------------------------------------------------------- command line
def test_cli_audit_writes_the_run_dirs_audit_json(block_csv, tmp_path, capsys):
    cfg = RunConfig.from_flat({"data.source": str(block_csv), "model.dim": 8, "dp.noise-multiplier": 0.7,
                               "dp.clip": 0.5})
    run = RunDir.create(tmp_path / "runs", cfg)
    out_json = tmp_path / "figures.json"
    code = main(["audit", "leakage", "--clients", "6", "--run-dir", str(run.path), "--json", str(out_json)])
    out = capsys.readouterr().out
    assert code == 0
    assert "plaintext" in out and "released" in out and "AUC" in out
    figures = json.loads((run.path / "audit.json").read_text())
    assert figures == json.loads(out_json.read_text())
    assert figures["sigma"] == 0.7 and figures["clip"] == 0.5 and figures["clients"] == 6  # the run's config
    from server.report import build_report

    assert build_report(run.path)["audit"] == figures


def test_cli_audit_refuses_more_clients_than_users(block_csv, capsys):
    code = main(["audit", "leakage", "--data", str(block_csv), "--clients", "50"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and "only 12 users" in err.strip().splitlines()[-1]
    assert main(["audit", "leakage", "--run-dir", "/nonexistent/run"]) == 2
