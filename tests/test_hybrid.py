"""Hybrid CF + text scoring, the genre-popularity baseline and the adapter's local step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.models import ItemParams, UserData
from common.models.hybrid.blend import (
    blend_scores,
    genre_popularity_scores,
    hybrid_item_params,
    text_only_scores,
    user_profiles,
    zscore_rows,
)
from common.models.hybrid.encoder import TextItemEncoder, item_vectors, tokenize, trainable_names, trainable_state
from common.models.hybrid.train import adapter_update
from common.models.mf.params import init_items
from common.models.reconstruction import sample_negatives, score_users
from tests.conftest import ITEM_TEXTS

torch.set_num_threads(1)


def ranking(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")


# ---------------------------------------------------------------- the seed formula

def test_blend_extremes_rank_like_each_source():
    rng = np.random.default_rng(0)
    r_cf, r_cb = rng.standard_normal((5, 30)) * 4 + 2, rng.uniform(0.2, 0.6, (5, 30))
    assert np.array_equal(ranking(blend_scores(r_cf, r_cb, 1.0)), ranking(r_cf))
    assert np.array_equal(ranking(blend_scores(r_cf, r_cb, 0.0)), ranking(r_cb))
    mixed = blend_scores(r_cf, r_cb, 0.5)
    assert not np.array_equal(ranking(mixed), ranking(r_cf)) and not np.array_equal(ranking(mixed), ranking(r_cb))


def test_blend_is_invariant_to_each_users_score_scale():
    rng = np.random.default_rng(1)
    r_cf, r_cb = rng.standard_normal((3, 20)), rng.standard_normal((3, 20))
    scale, shift = np.array([[0.01], [1.0], [100.0]]), np.array([[5.0], [-3.0], [0.0]])
    np.testing.assert_allclose(blend_scores(r_cf * scale + shift, r_cb, 0.3), blend_scores(r_cf, r_cb, 0.3), atol=1e-9)
    z = zscore_rows(r_cf)
    np.testing.assert_allclose(z.mean(1), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(1), 1)
    assert np.array_equal(zscore_rows(np.ones((1, 4))), np.zeros((1, 4)))
    with pytest.raises(ValueError):
        blend_scores(r_cf, r_cb, 1.5)


def test_text_only_scores_are_cosines_with_the_profile():
    rng = np.random.default_rng(2)
    text = rng.standard_normal((6, 4))
    scores = text_only_scores([np.array([0, 2]), np.array([], dtype=np.int64)], text)
    profile = (text[0] + text[2]) / 2
    expected = text @ profile / (np.linalg.norm(text, axis=1) * np.linalg.norm(profile))
    np.testing.assert_allclose(scores[0], expected)
    assert np.array_equal(scores[1], np.zeros(6))  # no history: no opinion
    np.testing.assert_allclose(user_profiles([np.array([1])], text)[0], text[1])


# ---------------------------------------------------------------- the learned variant

def test_hybrid_params_with_zero_free_part_rank_by_text():
    rng = np.random.default_rng(3)
    text = rng.standard_normal((12, 5)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    free = ItemParams(np.zeros((12, 5), np.float32), np.zeros(12, np.float32))
    history = [np.array([0, 3, 4]), np.array([7])]
    profiles = user_profiles(history, text).astype(np.float32)
    hybrid = hybrid_item_params(free, text)
    assert np.array_equal(ranking(score_users(hybrid, profiles)), ranking(text_only_scores(history, text)))


def test_hybrid_params_add_text_and_score_cold_items_from_text():
    rng = np.random.default_rng(4)
    free = init_items(6, 3, seed=0, scale=1.0)
    free.bias[:] = [1.0, 2.0, 3.0, 9.0, 9.0, 4.0]
    text = rng.standard_normal((6, 3)).astype(np.float32)
    warm = hybrid_item_params(free, text)
    np.testing.assert_allclose(warm.embeddings, free.embeddings + text)
    assert np.array_equal(warm.bias, free.bias)

    cold = hybrid_item_params(free, text, cold_items=np.array([3, 4]))
    np.testing.assert_allclose(cold.embeddings[[3, 4]], text[[3, 4]])
    np.testing.assert_allclose(cold.bias[[3, 4]], 2.5)  # mean bias of the warm items 0, 1, 2, 5
    np.testing.assert_allclose(cold.embeddings[0], free.embeddings[0] + text[0])
    assert hybrid_item_params(free, text, cold_items=np.array([3]), cold_bias=-1.0).bias[3] == -1.0
    assert np.array_equal(free.bias[[3, 4]], [9.0, 9.0])  # input untouched
    with pytest.raises(ValueError):
        hybrid_item_params(free, text[:, :2])


# ---------------------------------------------------------------- genre popularity baseline

def test_genre_popularity_prefers_popular_items_in_the_users_genres():
    genres = [("Comedy",), ("Comedy",), ("Horror",), ("Drama",), (), ("Comedy",), ("Comedy", "Romance"), ("Drama",)]
    counts = np.array([100, 10, 500, 50, 1000, 5, 5, 5])
    history = [np.array([5, 6, 7]), np.array([], dtype=np.int64)]  # 2/3 Comedy, 1/3 Drama, 1/3 Romance
    scores = genre_popularity_scores(history, genres, counts)
    candidates = np.array([0, 1, 2, 3, 4])
    order = candidates[np.argsort(-scores[0, candidates], kind="stable")]
    # popular comedy, unpopular comedy, drama; then out-of-genre items by popularity
    assert order.tolist() == [0, 1, 3, 4, 2]
    np.testing.assert_allclose(scores[0, 0], (2 / 3 + 1e-6) * np.log1p(100))
    assert ranking(scores[1:])[0].tolist() == np.argsort(-counts, kind="stable").tolist()  # no history: MostPop


# ---------------------------------------------------------------- the adapter's local step



def test_adapter_update_trains_only_the_adapter_and_lowers_the_loss():
    dim = 8
    encoder = TextItemEncoder(dim, seed=0)
    tokens = tokenize(ITEM_TEXTS)
    free = init_items(len(ITEM_TEXTS), dim, seed=1, scale=0.1)
    user = UserData(np.array([0, 1, 2]), np.ones(3, np.float32))
    user_vector = np.random.default_rng(2).standard_normal(dim).astype(np.float32)
    base_before = {n: p.detach().clone() for n, p in encoder.named_parameters() if not p.requires_grad}
    candidates = np.r_[user.items, sample_negatives(user.items, len(ITEM_TEXTS), 4, np.random.default_rng(5))]

    def sampled_softmax_loss() -> float:  # the objective, computed independently of adapter_update
        s = (free.embeddings + item_vectors(encoder, ITEM_TEXTS))[candidates] @ user_vector + free.bias[candidates]
        return float(np.log(np.exp(s).sum()) - s[:3].mean())

    initial = sampled_softmax_loss()

    losses, start = [], trainable_state(encoder)
    total = {k: np.zeros_like(v) for k, v in start.items()}
    for _ in range(4):  # the same negatives every call, so the losses are comparable
        delta, loss = adapter_update(encoder, free, user, tokens, user_vector=user_vector,
                                     negatives_rng=np.random.default_rng(5), n_neg=4, lr=0.5, epochs=1)
        assert list(delta) == trainable_names(encoder)
        total = {k: total[k] + delta[k] for k in total}
        losses.append(loss)
    assert losses[0] == pytest.approx(initial, rel=1e-4)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert sampled_softmax_loss() < losses[-1] < initial
    end = trainable_state(encoder)
    for key in start:
        np.testing.assert_allclose(total[key], end[key] - start[key], atol=1e-6)
    assert np.abs(total["head.weight"]).max() > 0
    assert any(np.abs(v).max() > 0 for k, v in total.items() if "lora_B" in k)
    for name, p in encoder.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), name

    with pytest.raises(ValueError):
        adapter_update(encoder, free, UserData(np.array([], np.int64), np.array([], np.float32)), tokens,
                       user_vector=user_vector, negatives_rng=np.random.default_rng(0), n_neg=2, lr=0.1, epochs=1)
