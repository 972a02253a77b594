"""Synthetic sources user by user: generation, split and a simulated client's data from one
user's rows alone, equal to the whole-data path; the ML-20M-shaped ``synthetic:USERS:ITEMS``."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

import client.data as client_data
from common.choices import Split
from common.config import DataConfig
from common.data import load_interactions
from common.data.catalog import load_catalog
from common.data.splits import split_interactions, user_parts
from common.data.synthetic import (
    BASE_ITEMS,
    SyntheticUsers,
    parse_synthetic_shape,
    synthetic_like,
    synthetic_source,
)
from common.data.texts import item_texts
from common.evaluation import EvalSets
from common.models import ClientData


@pytest.fixture(scope="module")
def base():
    return load_interactions("ml-100k")


def test_the_whole_set_is_the_users_concatenated(base):
    whole = load_interactions("synthetic:300")
    users = synthetic_source("synthetic:300")
    rows = [users.user(u) for u in range(300)]
    np.testing.assert_array_equal(whole.user, np.repeat(np.arange(300), [len(r[0]) for r in rows]))
    for k, name in enumerate(("item", "rating", "timestamp")):
        np.testing.assert_array_equal(getattr(whole, name), np.concatenate([r[k] for r in rows]))
    assert whole.item.dtype == np.int64 and whole.rating.dtype == np.float32 and whole.timestamp.dtype == np.float64
    np.testing.assert_array_equal(whole.item, synthetic_like(base, 300, seed=0).item)
    assert whole.keyed_split


def test_a_user_depends_on_seed_and_index_alone(base):
    small, large = SyntheticUsers(base, 20, seed=3), SyntheticUsers(base, 100_000, seed=3)
    for u in (0, 7, 19):
        for a, b in zip(small.user(u), large.user(u)):
            np.testing.assert_array_equal(a, b)
    other = SyntheticUsers(base, 20, seed=4)
    assert any(not np.array_equal(small.user(u)[0], other.user(u)[0]) for u in range(20))
    with pytest.raises(ValueError, match="out of range"):
        small.user(20)


@pytest.mark.parametrize("kind", [Split.RANDOM, Split.LEAVE_LAST_OUT])
def test_the_whole_split_is_the_per_user_split(kind):
    data = load_interactions("synthetic:200")
    split = split_interactions(data, kind, seed=5)
    parts = np.full(len(data), -1)
    for value, subset in enumerate((split.train, split.valid, split.test)):
        rows = np.flatnonzero(np.isin(data.user * data.n_items + data.item, subset.user * data.n_items + subset.item))
        parts[rows] = value
    assert (parts >= 0).all()
    for u in range(200):
        mine = data.user == u
        np.testing.assert_array_equal(parts[mine], user_parts(u, data.timestamp[mine], kind, seed=5))
    # the keyed random split still splits each user ~80/10/10
    if kind == Split.RANDOM:
        assert len(split.train) / len(data) == pytest.approx(0.8, abs=0.02)


def test_read_data_keeps_its_one_generator_split(base):
    # not keyed: the split of ML-100K is what it always was (one generator over the whole data set)
    assert not base.keyed_split
    split = split_interactions(base, "random", seed=0)
    assert not split.train.keyed_split and len(split.train) + len(split.valid) + len(split.test) == len(base)


def _whole_client(data: DataConfig, pid: int, kind: str, num_silos: int = 7) -> ClientData:
    """The client's data as the whole-data path builds it."""
    interactions = load_interactions(data.source, data.format)
    sets = EvalSets.from_split(split_interactions(interactions, data.split, seed=data.seed,
                                                  cold_fraction=data.cold_fraction))
    parts = client_data.partition_users(len(sets.train), kind, num_silos=num_silos, seed=11)
    return ClientData.from_sets(pid, parts[pid], sets)


def _assert_same(a: ClientData, b: ClientData) -> None:
    assert a.client_id == b.client_id and a.users == b.users
    assert len(a.train) == len(b.train)
    for x, y in zip(a.train, b.train):
        assert x.items.dtype == y.items.dtype and x.ratings.dtype == y.ratings.dtype
        np.testing.assert_array_equal(x.items, y.items)
        np.testing.assert_array_equal(x.ratings, y.ratings)
    for x, y in zip(a.valid + a.test, b.valid + b.test):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", [Split.RANDOM, Split.LEAVE_LAST_OUT])
def test_one_client_equals_the_whole_data_path(kind, monkeypatch):
    data = DataConfig(source="synthetic:400", split=kind, seed=2)
    expected = {pid: _whole_client(data, pid, "user") for pid in (0, 1, 57, 399)}
    silo = _whole_client(data, 3, "silo")

    def refuse(*args, **kwargs):
        raise AssertionError("the whole data set was loaded for one client")

    monkeypatch.setattr(client_data, "load_interactions", refuse)
    monkeypatch.setattr(SyntheticUsers, "interactions", refuse)
    for pid, whole in expected.items():
        _assert_same(client_data.simulated_client_data(data, pid, kind="user", num_silos=7, seed=11), whole)
    _assert_same(client_data.simulated_client_data(data, 3, kind="silo", num_silos=7, seed=11), silo)
    assert client_data.num_clients(data, "user", 7, 11) == 400
    assert client_data.num_clients(data, "silo", 7, 11) == 7
    assert client_data.simulated_item_count(data) == BASE_ITEMS
    with pytest.raises(ValueError, match="out of range"):
        client_data.simulated_client_data(data, 400, kind="user", num_silos=7, seed=11)


def test_the_cold_item_split_keeps_the_whole_data_path():
    data = DataConfig(source="synthetic:150", split=Split.COLD_ITEM, seed=1)
    _assert_same(client_data.simulated_client_data(data, 9, kind="user", num_silos=7, seed=11),
                 _whole_client(data, 9, "user"))


def test_one_client_of_100000_is_cheap():
    """A simulated client of synthetic:100000 generates its user only: the whole set would be
    ~10.6M rows (~300 MB); one client's data takes a few kB and well under a second."""
    synthetic_source("synthetic:1")  # ML-100K read once (cached per process, as in a Ray worker)
    data = DataConfig(source="synthetic:100000")
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        assert client_data.num_clients(data, "user", 10, 0) == 100_000
        assert client_data.simulated_item_count(data) == BASE_ITEMS
        first = client_data.simulated_client_data(data, 99_999, kind="user", num_silos=10, seed=0)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first.users == (99_999,) and len(first.train[0].items) > 0
    assert seconds < 1.0, seconds
    assert peak < 20e6, peak
    t0 = time.perf_counter()
    for pid in range(0, 100_000, 1000):  # a hundred clients, as a round samples
        client_data.simulated_client_data(data, pid, kind="user", num_silos=10, seed=0)
    assert time.perf_counter() - t0 < 2.0


def test_an_ml20m_shaped_catalogue(base):
    source = "synthetic:600:27000"
    assert parse_synthetic_shape(source) == (600, 27000)
    data = load_interactions(source)
    assert data.n_users == 600 and data.n_items == 27000 and len(set(data.item_ids)) == 27000
    assert data.item_ids[:BASE_ITEMS] == base.item_ids and data.items[:BASE_ITEMS] == base.items
    toy = base.item_ids.index("1")
    copy = data.items[toy + BASE_ITEMS]
    assert copy.title == "Toy Story #2" and copy.genres == base.items[toy].genres and copy.year == "1995"
    assert data.item_ids[toy + 2 * BASE_ITEMS] == "1#3"
    # everything that reads the catalogue agrees on ITEMS, without generating the users
    cfg = DataConfig(source=source)
    ids, titles = load_catalog(cfg)
    assert ids == data.item_ids and titles[toy + BASE_ITEMS] == "Toy Story #2 (1995)"
    assert set(titles[BASE_ITEMS:]).isdisjoint(titles[:BASE_ITEMS])  # a copy is never taken for its base item
    assert item_texts(cfg) == tuple(data.item_texts())
    assert client_data.simulated_item_count(cfg) == 27000
    # the copied users' own items (< 1682) stay; swaps reach the copies, fewer for later copies
    same_users = load_interactions("synthetic:600")
    assert len(same_users) == len(data)
    kept = data.item < BASE_ITEMS
    assert 0.7 < kept.mean() < 0.95
    copies = np.bincount(data.item[~kept] // BASE_ITEMS, minlength=27000 // BASE_ITEMS + 1)[1:]
    assert copies[0] > copies[5] > copies[14] > 0
    pairs = data.user * data.n_items + data.item
    assert len(np.unique(pairs)) == len(pairs)
    # the long tail: a copy of a popular base item is swapped in far more often than one of an unpopular item
    popularity = np.bincount(base.item, minlength=BASE_ITEMS)
    top, tail = np.argsort(-popularity)[:50], np.argsort(popularity)[:800]
    swapped = np.bincount(data.item[~kept] % BASE_ITEMS, minlength=BASE_ITEMS)
    assert swapped[top].mean() > 20 * max(swapped[tail].mean(), 1e-3)


@pytest.mark.parametrize("source, problem", [
    ("synthetic:10:100", "≥ 1682"),
    ("synthetic:10:abc", "synthetic:N:ITEMS"),
    ("synthetic:10:2000:3", "synthetic:N:ITEMS"),
    ("synthetic:0:2000", "users must be ≥ 1"),
])
def test_a_bad_synthetic_shape_is_refused_clearly(source, problem):
    with pytest.raises(ValueError, match=problem):
        load_interactions(source)
    with pytest.raises(ValueError, match=problem):
        load_catalog(DataConfig(source=source))
