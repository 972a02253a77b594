"""Full-ranking metrics (common.metrics): hand-computed values and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.metrics import RANKING_METRICS, coverage, evaluate_scores, novelty, rmse, top_k, user_ranking_metrics

EMPTY = np.array([], dtype=np.int64)


def ids(*items: int) -> np.ndarray:
    return np.array(items, dtype=np.int64)


# ---------------------------------------------------------------- a tiny example by hand
#
# 6 items, k = 3, three users.
# user 0: scores 0.9 0.8 0.7 0.6 0.5 0.4, trained on item 0 (masked), targets {2, 4}.
#         ranking without item 0: 1 2 3 | 4 5  → top-3 [1, 2, 3], hits [0, 1, 0]
#         HR = 1, Recall = 1/2, Precision = 1/3, MRR = 1/2 (first hit at rank 2)
#         DCG = 1/log2(3) = 0.63093; IDCG (2 targets) = 1/log2(2) + 1/log2(3) = 1.63093
#         NDCG = 0.63093 / 1.63093 = 0.38685
# user 1: scores 0.1 0.2 0.3 0.4 0.5 0.6, trained on item 5 (masked), targets {4}.
#         top-3 [4, 3, 2], hits [1, 0, 0]: HR = Recall = NDCG = MRR = 1, Precision = 1/3
# user 2: no targets → skipped (counts in no average).
# Means over users 0 and 1:
#   HR 1, Recall 0.75, NDCG (0.38685 + 1)/2 = 0.69343, MRR 0.75, Precision 1/3.
# Coverage@3: recommended {1, 2, 3, 4} → 4/6.
# Novelty@3 with training popularity [3, 3, 3, 1, 0, 3] over n_users = 3:
#   item 1, 2: −log2(3/3) = 0; item 3: −log2(1/3) = log2 3; item 4 (unseen → 1): log2 3.
#   recommended 1 2 3 4 3 2 → (0 + 0 + log2 3 + log2 3 + log2 3 + 0) / 6 = log2(3) / 2.

SCORES = np.array([
    [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
])
EXCLUDE = [ids(0), ids(5), EMPTY]
TARGETS = [ids(2, 4), ids(4), EMPTY]
POPULARITY = np.array([3, 3, 3, 1, 0, 3])
NDCG_USER0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))


def test_top_k_by_hand():
    np.testing.assert_array_equal(top_k(SCORES[:2], EXCLUDE[:2], 3), [[1, 2, 3], [4, 3, 2]])


def test_user_ranking_metrics_by_hand():
    ranked = top_k(SCORES, EXCLUDE, 3)
    m = user_ranking_metrics(ranked, TARGETS, 3)
    assert set(m) == set(RANKING_METRICS)
    np.testing.assert_allclose(m["hr"][:2], [1, 1])
    np.testing.assert_allclose(m["recall"][:2], [0.5, 1])
    np.testing.assert_allclose(m["precision"][:2], [1 / 3, 1 / 3])
    np.testing.assert_allclose(m["mrr"][:2], [0.5, 1])
    np.testing.assert_allclose(m["ndcg"][:2], [NDCG_USER0, 1])
    assert NDCG_USER0 == pytest.approx(0.38685, abs=1e-5)
    for values in m.values():  # the user without targets is NaN, never 0
        assert np.isnan(values[2])


def test_evaluate_scores_by_hand():
    out = evaluate_scores([(np.arange(3), SCORES)], EXCLUDE, TARGETS, n_items=6,
                          item_popularity=POPULARITY, ks=(3,))
    assert out["users"] == 2
    assert out["hr@3"] == pytest.approx(1.0)
    assert out["recall@3"] == pytest.approx(0.75)
    assert out["ndcg@3"] == pytest.approx((NDCG_USER0 + 1) / 2)
    assert out["ndcg@3"] == pytest.approx(0.69343, abs=1e-5)
    assert out["mrr@3"] == pytest.approx(0.75)
    assert out["precision@3"] == pytest.approx(1 / 3)
    assert out["coverage@3"] == pytest.approx(4 / 6)
    assert out["novelty@3"] == pytest.approx(math.log2(3) / 2)


def test_evaluate_scores_in_batches_equals_one_batch():
    whole = evaluate_scores([(np.arange(3), SCORES)], EXCLUDE, TARGETS, n_items=6,
                            item_popularity=POPULARITY, ks=(1, 3))
    split = evaluate_scores([(ids(0), SCORES[:1]), (ids(1, 2), SCORES[1:])], EXCLUDE, TARGETS,
                            n_items=6, item_popularity=POPULARITY, ks=(1, 3))
    assert whole == pytest.approx(split)


def test_no_user_with_targets_gives_no_metrics():
    out = evaluate_scores([(np.arange(2), SCORES[:2])], [EMPTY, EMPTY], [EMPTY, EMPTY], n_items=6,
                          item_popularity=POPULARITY, ks=(3,))
    assert out == {"users": 0}


def test_excluded_item_with_the_best_score_is_never_ranked():
    scores = np.array([[10.0, 1.0, 2.0, 3.0]])
    assert 0 not in top_k(scores, [ids(0)], 3)[0]
    m = user_ranking_metrics(top_k(scores, [ids(0)], 3), [ids(0)], 3)
    assert m["hr"][0] == 0 and m["ndcg"][0] == 0


def test_coverage_and_novelty_by_hand():
    ranked = np.array([[0, 1], [0, 2]])
    assert coverage(ranked, 5, 2) == pytest.approx(3 / 5)
    assert coverage(ranked, 5, 1) == pytest.approx(1 / 5)
    # pop [2, 1, 0] over 4 users: −log2(2/4) = 1, −log2(1/4) = 2, unseen counts once → 2
    # recommended 0 1 0 2 → (1 + 2 + 1 + 2) / 4 = 1.5
    assert novelty(ranked, np.array([2, 1, 0, 5, 5]), 4, 2) == pytest.approx(1.5)


def test_rmse_by_hand():
    # errors 0, 0, −2 → sqrt(4/3)
    assert rmse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0])) == pytest.approx(math.sqrt(4 / 3))
    assert rmse(np.array([2.5]), np.array([2.5])) == 0.0
    assert math.isnan(rmse(np.array([]), np.array([])))


# ---------------------------------------------------------------- tie-breaking

def test_top_k_ties_inside_the_list_go_to_the_lower_index():
    scores = np.array([[1.0, 5.0, 5.0, 5.0, 0.0, 5.0], [3.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    np.testing.assert_array_equal(top_k(scores, [EMPTY, EMPTY], 4), [[1, 2, 3, 5], [0, 1, 2, 3]])
    np.testing.assert_array_equal(top_k(scores, [ids(2), ids(0, 1)], 3), [[1, 3, 5], [2, 3, 4]])


def reference_top_k(row: np.ndarray, excluded: np.ndarray, k: int) -> list[int]:
    allowed = [i for i in range(len(row)) if i not in set(excluded.tolist())]
    return sorted(allowed, key=lambda i: (-row[i], i))[:k]


@st.composite
def ranking_case(draw, *, max_users: int = 6, max_items: int = 25, tied: bool = False):
    """Scores (B, I), per-user excluded items, per-user targets (disjoint from excluded), k.

    ``tied`` draws scores from {0, 1, 2} so ties are everywhere, including at the k-th place;
    otherwise all scores are distinct.
    """
    n_users = draw(st.integers(1, max_users))
    n_items = draw(st.integers(2, max_items))
    elements = st.integers(0, 2).map(float) if tied else st.floats(-1e3, 1e3, allow_nan=False)
    scores = draw(hnp.arrays(np.float64, (n_users, n_items), elements=elements, unique=not tied))
    exclude, targets = [], []
    for _ in range(n_users):
        chosen = draw(st.lists(st.integers(0, n_items - 1), unique=True, max_size=n_items - 1))
        cut = draw(st.integers(0, len(chosen)))
        exclude.append(np.array(sorted(chosen[:cut]), dtype=np.int64))
        targets.append(np.array(sorted(chosen[cut:]), dtype=np.int64))
    most_excluded = max(len(e) for e in exclude)
    k = draw(st.integers(1, n_items - most_excluded))  # never more than the items left to rank
    return scores, exclude, targets, k


@settings(max_examples=150, deadline=None)
@given(ranking_case())
def test_top_k_never_returns_excluded_items(case):
    scores, exclude, _, k = case
    ranked = top_k(scores, exclude, k)
    assert ranked.shape == (len(scores), k)
    for row, ex in zip(ranked, exclude):
        assert not np.isin(row, ex).any()
        assert len(np.unique(row)) == k


@settings(max_examples=150, deadline=None)
@given(ranking_case(tied=False))
def test_top_k_matches_a_sorted_reference(case):
    scores, exclude, _, k = case  # distinct scores: the order is fully determined by them
    for row, ex, got in zip(scores, exclude, top_k(scores, exclude, k)):
        assert got.tolist() == reference_top_k(row, ex, k)


@settings(max_examples=150, deadline=None)
@given(ranking_case(tied=True))
def test_top_k_breaks_every_tie_by_lower_index(case):
    scores, exclude, _, k = case
    for row, ex, got in zip(scores, exclude, top_k(scores, exclude, k)):
        assert got.tolist() == reference_top_k(row, ex, k)


# ---------------------------------------------------------------- properties of the metrics

@settings(max_examples=150, deadline=None)
@given(ranking_case(tied=True), st.sampled_from([1, 3, 10]))
def test_all_metrics_are_in_unit_interval(case, k):
    scores, exclude, targets, _ = case
    ranked = top_k(scores, exclude, k)
    has_target = np.array([len(t) > 0 for t in targets])
    for name, values in user_ranking_metrics(ranked, targets, k).items():
        assert np.isnan(values[~has_target]).all(), name
        v = values[has_target]
        assert ((v >= 0) & (v <= 1 + 1e-12)).all(), name
    out = evaluate_scores([(np.arange(len(scores)), scores)], exclude, targets, n_items=scores.shape[1],
                          item_popularity=np.ones(scores.shape[1], dtype=np.int64), ks=(k,))
    for name, value in out.items():
        if name != "users" and not name.startswith("novelty"):
            assert 0 <= value <= 1 + 1e-12, name


@settings(max_examples=150, deadline=None)
@given(ranking_case(), st.sampled_from([1, 5, 10]))
def test_a_perfect_ranking_scores_one(case, k):
    scores, exclude, targets, _ = case
    assume(any(len(t) for t in targets))
    perfect = np.zeros_like(scores)
    for row, t in enumerate(targets):
        perfect[row, t] = 1.0  # targets above everything else; excluded items are masked anyway
    out = evaluate_scores([(np.arange(len(scores)), perfect)], exclude, targets, n_items=scores.shape[1],
                          item_popularity=np.ones(scores.shape[1], dtype=np.int64), ks=(k,))
    assert out[f"ndcg@{k}"] == pytest.approx(1.0)
    assert out[f"hr@{k}"] == pytest.approx(1.0)
    assert out[f"mrr@{k}"] == pytest.approx(1.0)
    if all(len(t) <= k for t in targets):
        assert out[f"recall@{k}"] == pytest.approx(1.0)


@settings(max_examples=100, deadline=None)
@given(ranking_case(), st.integers(1, 4))
def test_users_without_targets_are_skipped(case, extra):
    scores, exclude, targets, k = case
    assume(any(len(t) for t in targets))
    n_items = scores.shape[1]
    pop = np.arange(n_items)
    base = evaluate_scores([(np.arange(len(scores)), scores)], exclude, targets, n_items=n_items,
                           item_popularity=pop, ks=(k,))
    # the same users plus ``extra`` users with random scores and no held-out item
    more_scores = np.vstack([scores, np.random.default_rng(0).standard_normal((extra, n_items))])
    more = evaluate_scores([(np.arange(len(more_scores)), more_scores)], exclude + [EMPTY] * extra,
                           targets + [EMPTY] * extra, n_items=n_items, item_popularity=pop, ks=(k,))
    assert more["users"] == base["users"] == sum(len(t) > 0 for t in targets)
    for name in [f"{m}@{k}" for m in RANKING_METRICS] + [f"coverage@{k}"]:
        assert more[name] == pytest.approx(base[name]), name
