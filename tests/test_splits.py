"""Splits (common.data.splits) and client partitions (common.data.partition).

Every data set here is synthetic and built in the file with ``build_interactions``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.data.dataset import Interactions, build_interactions
from common.data.partition import partition_users
from common.data.splits import _ratio_counts, split_interactions


def make_data(counts: list[int], *, n_items: int = 60, seed: int = 0) -> Interactions:
    """User ``u`` rates ``counts[u]`` distinct items at random, with distinct random timestamps."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u, c in enumerate(counts):
        users += [f"u{u:03d}"] * c
        items += [f"i{i:03d}" for i in rng.choice(n_items, size=c, replace=False)]
    timestamp = rng.permutation(len(users)).astype(np.float64) * 10.0
    rating = rng.integers(1, 6, size=len(users)).astype(np.float32)
    return build_interactions("toy", users, items, rating, timestamp)


def keys(data: Interactions) -> np.ndarray:
    """One integer per interaction: the (user, item) pair (duplicates are dropped on build)."""
    return data.user * data.n_items + data.item


def per_user_counts(data: Interactions) -> np.ndarray:
    return np.bincount(data.user, minlength=data.n_users)


def assert_partition_of(data: Interactions, parts: list[Interactions]) -> None:
    """``parts`` are pairwise disjoint and together hold exactly the rows of ``data``."""
    all_keys = np.concatenate([keys(p) for p in parts])
    assert len(all_keys) == len(np.unique(all_keys)), "an interaction is in two parts"
    np.testing.assert_array_equal(np.sort(all_keys), np.sort(keys(data)))
    for p in parts:  # same id space as the source
        assert p.user_ids == data.user_ids and p.item_ids == data.item_ids


def assert_same_split(a, b) -> None:
    for name in ("train", "valid", "test", "cold_test"):
        np.testing.assert_array_equal(keys(getattr(a, name)), keys(getattr(b, name)))
    np.testing.assert_array_equal(a.cold_items, b.cold_items)


# ---------------------------------------------------------------- RecBole's ratio counts

@pytest.mark.parametrize(("total", "expected"), [
    # valid/test get floor(0.1·n); train the rest ...
    (20, (16, 2, 2)),
    (10, (8, 1, 1)),
    (25, (21, 2, 2)),
    # ... and a part whose share 0.1·n is in (0, 1) gets one row while train keeps > 1 row:
    # n=5: floor → (5, 0, 0); test 0.5 → (4, 0, 1); valid 0.5 → (3, 1, 1).
    (5, (3, 1, 1)),
    (3, (1, 1, 1)),  # (3,0,0) → (2,0,1) → (1,1,1)
    (2, (1, 0, 1)),  # (2,0,0) → (1,0,1), then train is down to one row: stop
    (1, (1, 0, 0)),
])
def test_ratio_counts_match_recbole(total, expected):
    assert _ratio_counts(total, (0.8, 0.1, 0.1)) == expected


@given(st.integers(1, 2000))
def test_ratio_counts_sum_to_total_and_train_keeps_a_row(total):
    n_tr, n_va, n_te = _ratio_counts(total, (0.8, 0.1, 0.1))
    assert n_tr + n_va + n_te == total
    assert min(n_tr, n_va, n_te) >= 0 and n_tr >= 1
    assert n_va <= max(1, int(0.1 * total)) and n_te <= max(1, int(0.1 * total))


# ---------------------------------------------------------------- random 80/10/10

COUNTS = [20, 5, 10, 3, 2, 1, 37, 20]


def test_random_split_is_disjoint_and_covers_all_rows():
    data = make_data(COUNTS)
    split = split_interactions(data, "random", seed=0)
    assert_partition_of(data, [split.train, split.valid, split.test])
    assert len(split.cold_items) == 0 and len(split.cold_test) == 0
    assert split.kind == "random" and split.seed == 0


def test_random_split_per_user_counts_match_recbole():
    data = make_data(COUNTS)
    split = split_interactions(data, "random", seed=3)
    tr, va, te = (per_user_counts(p) for p in (split.train, split.valid, split.test))
    for u, total in enumerate(COUNTS):
        assert (tr[u], va[u], te[u]) == _ratio_counts(total, (0.8, 0.1, 0.1)), f"user {u} ({total} rows)"
    # The two cases spelled out: 20 → 16/2/2 and 5 → 3/1/1.
    assert (tr[0], va[0], te[0]) == (16, 2, 2)
    assert (tr[1], va[1], te[1]) == (3, 1, 1)


def test_random_split_is_deterministic_per_seed_and_differs_across_seeds():
    data = make_data(COUNTS)
    assert_same_split(split_interactions(data, "random", seed=7), split_interactions(data, "random", seed=7))
    a, b = split_interactions(data, "random", seed=0), split_interactions(data, "random", seed=1)
    assert not np.array_equal(np.sort(keys(a.test)), np.sort(keys(b.test)))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=12), st.integers(0, 2**16))
def test_random_split_property(counts, seed):
    data = make_data(counts, n_items=30, seed=seed)
    split = split_interactions(data, "random", seed=seed)
    assert_partition_of(data, [split.train, split.valid, split.test])
    tr = per_user_counts(split.train)
    assert (tr[np.asarray(counts) > 0] >= 1).all(), "every user keeps a training row"


def test_bad_split_arguments_are_refused():
    data = make_data([5, 5])
    with pytest.raises(ValueError, match="unknown split"):
        split_interactions(data, "temporal")
    with pytest.raises(ValueError, match="sum to 1"):
        split_interactions(data, "random", ratios=(0.8, 0.1, 0.2))


# ---------------------------------------------------------------- leave-last-out

def test_leave_last_out_puts_latest_in_test_and_second_latest_in_valid():
    data = make_data([8, 3, 12, 5])
    split = split_interactions(data, "leave-last-out")
    assert_partition_of(data, [split.train, split.valid, split.test])
    for u in range(data.n_users):
        own = data.user == u
        ts = np.sort(data.timestamp[own])
        (test_t,) = split.test.timestamp[split.test.user == u]
        (valid_t,) = split.valid.timestamp[split.valid.user == u]
        assert test_t == ts[-1] and valid_t == ts[-2]
        assert (split.train.timestamp[split.train.user == u] < valid_t).all()


def test_leave_last_out_short_histories_keep_training_rows():
    # 1 interaction: train only; 2: train + test (no validation row); 3: one of each.
    data = make_data([1, 2, 3])
    split = split_interactions(data, "leave-last-out")
    assert per_user_counts(split.train).tolist() == [1, 1, 1]
    assert per_user_counts(split.valid).tolist() == [0, 0, 1]
    assert per_user_counts(split.test).tolist() == [0, 1, 1]


# ---------------------------------------------------------------- cold items

@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_cold_item_split(fraction):
    data = make_data([20] * 12, n_items=40)
    split = split_interactions(data, "cold-item", seed=2, cold_fraction=fraction)
    seen = np.unique(data.item)
    assert len(split.cold_items) == round(fraction * len(seen))
    assert np.isin(split.cold_items, seen).all() and len(np.unique(split.cold_items)) == len(split.cold_items)
    for part in (split.train, split.valid, split.test):
        assert not np.isin(part.item, split.cold_items).any()
    # cold_test holds every row of every cold item, and nothing else
    is_cold = np.isin(data.item, split.cold_items)
    np.testing.assert_array_equal(np.sort(keys(split.cold_test)), np.sort(keys(data)[is_cold]))
    assert_partition_of(data, [split.train, split.valid, split.test, split.cold_test])
    assert_same_split(split, split_interactions(data, "cold-item", seed=2, cold_fraction=fraction))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_cold_fraction_out_of_range_is_refused(fraction):
    with pytest.raises(ValueError, match="cold_fraction"):
        split_interactions(make_data([5, 5]), "cold-item", cold_fraction=fraction)


# ---------------------------------------------------------------- client partitions

def test_partition_user_gives_one_user_per_client():
    parts = partition_users(7, "user")
    assert [p.tolist() for p in parts] == [[u] for u in range(7)]


@pytest.mark.parametrize(("n_users", "num_silos"), [(10, 3), (943, 10), (5, 5), (4, 1)])
def test_partition_silo_disjoint_covering_near_equal(n_users, num_silos):
    parts = partition_users(n_users, "silo", num_silos=num_silos, seed=1)
    assert len(parts) == num_silos
    everyone = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(everyone), np.arange(n_users))  # disjoint and covering
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(p.dtype == np.int64 for p in parts)
    again = partition_users(n_users, "silo", num_silos=num_silos, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_partition_silo_depends_on_seed():
    a = partition_users(100, "silo", num_silos=4, seed=0)
    b = partition_users(100, "silo", num_silos=4, seed=1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("num_silos", [0, -1, 11])
def test_partition_silo_bad_num_silos_raises(num_silos):
    with pytest.raises(ValueError, match="num_silos"):
        partition_users(10, "silo", num_silos=num_silos)


def test_partition_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown partition"):
        partition_users(10, "device")
