"""The text-first item tower (common/models/hybrid/tower.py): new items scored from their text
on the warm items' scale, warm items served exactly as released."""

import numpy as np
import pytest

from common.metrics import evaluate_scores
from common.models import ItemParams
from common.models.hybrid.tower import fit_text_tower, residuals, text_first_items


def linear_catalogue(n_items=300, dim=8, emb_dim=384, noise=0.0, seed=0):
    """Items whose released [vector, bias] is a linear function of their sentence embedding."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_items, emb_dim)).astype(np.float32) / np.sqrt(emb_dim)
    W = rng.normal(size=(emb_dim, dim + 1))
    Y = X @ W + np.r_[np.zeros(dim), 0.5] + noise * rng.normal(size=(n_items, dim + 1))
    return X, ItemParams(Y[:, :dim].astype(np.float32), Y[:, dim].astype(np.float32))


def test_warm_items_are_served_exactly_as_released():
    X, full = linear_catalogue(noise=0.3)
    new = np.arange(250, 300)
    tower = fit_text_tower(full, X, np.arange(250))
    served = text_first_items(full, tower, X, new, new_item_boost=0.7)
    np.testing.assert_array_equal(served.embeddings[:250], full.embeddings[:250])
    np.testing.assert_array_equal(served.bias[:250], full.bias[:250])
    # and text part + residual is the released item, for every item
    res, text = residuals(full, tower, X), tower.predict(X)
    np.testing.assert_allclose(text.embeddings + res.embeddings, full.embeddings, atol=1e-5)
    np.testing.assert_allclose(text.bias + res.bias, full.bias, atol=1e-5)


def test_a_new_item_gets_the_vector_its_text_predicts():
    """Fitted on warm items only, the tower recovers unseen items' vectors when text explains them."""
    X, full = linear_catalogue(n_items=1200, noise=0.0)
    new = np.arange(1000, 1200)
    tower = fit_text_tower(full, X, np.arange(1000))
    assert tower.cv_r2 > 0.98
    served = text_first_items(full, tower, X, new)
    def relative_error(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert relative_error(served.embeddings[new], full.embeddings[new]) < 0.15  # ridge shrinks a little
    assert relative_error(served.bias[new], full.bias[new]) < 0.15


def test_the_tower_is_fitted_on_the_known_items_only():
    """What the released vectors of new items hold (never trained: noise, or negatives) must not
    leak into their served vectors."""
    X, full = linear_catalogue(n_items=600, noise=0.0)
    new = np.arange(500, 600)
    spoiled = full.copy()
    spoiled.embeddings[new] = 100.0
    spoiled.bias[new] = -100.0
    a = text_first_items(full, fit_text_tower(full, X, np.arange(500)), X, new)
    b = text_first_items(spoiled, fit_text_tower(spoiled, X, np.arange(500)), X, new)
    np.testing.assert_allclose(a.embeddings[new], b.embeddings[new], atol=1e-6)
    np.testing.assert_allclose(a.bias[new], b.bias[new], atol=1e-6)


def test_the_boost_moves_only_new_items_biases_by_exactly_itself():
    X, full = linear_catalogue(noise=0.2)
    new = np.array([3, 77, 150])
    tower = fit_text_tower(full, X, np.setdiff1d(np.arange(300), new))
    base = text_first_items(full, tower, X, new)
    boosted = text_first_items(full, tower, X, new, new_item_boost=1.5)
    np.testing.assert_allclose(boosted.bias - base.bias, np.isin(np.arange(300), new) * 1.5, atol=1e-6)
    np.testing.assert_array_equal(boosted.embeddings, base.embeddings)


def test_text_that_explains_nothing_gives_heavy_ridge_and_low_r2():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 384)).astype(np.float32)
    full = ItemParams(rng.normal(size=(400, 4)).astype(np.float32), rng.normal(size=400).astype(np.float32))
    tower = fit_text_tower(full, X, np.arange(400))
    assert tower.cv_r2 < 0.05
    assert tower.ridge == max((0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0))


@pytest.mark.parametrize("bad, message", [
    (lambda X, full: fit_text_tower(full, X[:-1], np.arange(10)), "one sentence embedding per item"),
    (lambda X, full: fit_text_tower(full, X, np.arange(3)), "at least 5 items"),
    (lambda X, full: text_first_items(full, fit_text_tower(full, X, np.arange(200)), X, np.array([300])),
     r"new item indices must be in \[0, 300\)"),
    (lambda X, full: text_first_items(ItemParams(full.embeddings[:, :4], full.bias),
                                      fit_text_tower(full, X, np.arange(200)), X, np.array([1])),
     "8-dimensional vectors, the model has 4"),
])
def test_bad_input_is_refused_with_what_was_expected(bad, message):
    X, full = linear_catalogue()
    with pytest.raises(ValueError, match=message):
        bad(X, full)


def test_new_share_counts_the_top_k_slots_that_go_to_new_items():
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    out = evaluate_scores([(np.arange(2), scores)], [np.array([], dtype=np.int64)] * 2,
                          [np.array([0]), np.array([4])], n_items=5, item_popularity=np.ones(5), ks=(2,),
                          new_items=np.array([3, 4]))
    assert out["new_share@2"] == pytest.approx(0.5)  # user 0: none of {0, 1}; user 1: both of {4, 3}
