"""Synthetic users resampled from ML-100K (``synthetic:N``): sizes, determinism, statistics."""

from __future__ import annotations

import numpy as np
import pytest

from common.data import load_interactions
from common.data.synthetic import parse_synthetic_source, synthetic_like


@pytest.fixture(scope="module")
def base():
    return load_interactions("ml-100k")


@pytest.fixture(scope="module")
def synth(base):
    return synthetic_like(base, 2000, seed=0)


def test_size_and_catalogue(base, synth):
    assert synth.n_users == 2000
    assert len(np.unique(synth.user)) == 2000  # every synthetic user has interactions
    assert synth.item_ids == base.item_ids and synth.items == base.items
    assert synth.explicit == base.explicit
    # ~ the mean profile size of the base data times N
    assert len(synth) == pytest.approx(2000 * len(base) / base.n_users, rel=0.1)


def test_ids_are_valid_and_pairs_unique(synth):
    assert synth.user.min() == 0 and synth.user.max() == synth.n_users - 1
    assert synth.item.min() >= 0 and synth.item.max() < synth.n_items
    pairs = synth.user * synth.n_items + synth.item
    assert len(np.unique(pairs)) == len(pairs)
    assert len(set(synth.user_ids)) == synth.n_users
    assert np.all(np.isfinite(synth.rating)) and np.all(np.isfinite(synth.timestamp))
    assert set(np.unique(synth.rating)) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_deterministic_per_seed(base, synth):
    again = synthetic_like(base, 2000, seed=0)
    for name in ("user", "item", "rating", "timestamp"):
        np.testing.assert_array_equal(getattr(synth, name), getattr(again, name))
    other = synthetic_like(base, 2000, seed=1)
    assert not (len(other) == len(synth) and np.array_equal(other.item, synth.item))


def test_per_user_counts_follow_the_base(base, synth):
    real = np.bincount(base.user, minlength=base.n_users)
    fake = np.bincount(synth.user, minlength=synth.n_users)
    assert abs(np.median(fake) - np.median(real)) <= 0.2 * np.median(real)
    assert fake.min() >= real.min() and fake.max() <= real.max()


def test_items_are_swapped_but_popularity_is_kept(base, synth):
    # Popularity shares of the base and the synthetic data correlate strongly.
    p_real = np.bincount(base.item, minlength=base.n_items) / len(base)
    p_fake = np.bincount(synth.item, minlength=synth.n_items) / len(synth)
    assert np.corrcoef(p_real, p_fake)[0, 1] > 0.9
    # Not plain copies: profiles differ from every real user's (check a few users by their sizes).
    real_sets = {}
    for u in range(base.n_users):
        real_sets.setdefault(int((base.user == u).sum()), []).append(frozenset(base.item[base.user == u]))
    copies = 0
    for u in range(50):
        items = frozenset(synth.item[synth.user == u])
        copies += any(items == s for s in real_sets.get(len(items), []))
    assert copies <= 5  # a user with very few items can come out unchanged


def test_load_interactions_dispatches_synthetic_sources(base):
    data = load_interactions("synthetic:300")
    assert data.n_users == 300 and data.n_items == base.n_items
    np.testing.assert_array_equal(data.item, synthetic_like(base, 300, seed=0).item)


@pytest.mark.parametrize("source", ["synthetic:", "synthetic:abc", "synthetic:0", "synthetic:-5", "synthetic:1.5"])
def test_a_bad_synthetic_size_is_refused_clearly(source):
    with pytest.raises(ValueError, match="synthetic"):
        load_interactions(source)


def test_parse_synthetic_source():
    assert parse_synthetic_source("synthetic:10000") == 10000
    with pytest.raises(ValueError, match="data.format"):
        load_interactions("synthetic:10", "generic")
