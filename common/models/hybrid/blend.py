"""Ways to use item text beside collaborative filtering, and baselines for new items.

``blend_scores``         α·z(r_cf) + (1−α)·z(r_cb), a fixed mix of MF scores and content scores
``hybrid_item_params``   item vector = free embedding + projected text vector, scored by the
                         unchanged MF code; cold items (never interacted) are scored from text
``new_item_bias``        biases of new items predicted from their text (ridge on released biases)

plus the cold-start scorers ``text_only_scores`` and the ``genre_popularity_scores`` baseline.
Content scores ``r_cb`` are cosines between a user's profile (mean text vector of their
training items) and every item's text vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.models.contract import ItemParams
from common.models.hybrid.tower import ridge_cv


def zscore_rows(scores: np.ndarray) -> np.ndarray:
    """Each row shifted to mean 0 and scaled to std 1 (a constant row becomes all zeros)."""
    scores = np.asarray(scores, dtype=np.float64)
    centred = scores - scores.mean(axis=1, keepdims=True)
    std = centred.std(axis=1, keepdims=True)
    return centred / np.where(std > 0, std, 1.0)


def blend_scores(r_cf: np.ndarray, r_cb: np.ndarray, alpha: float) -> np.ndarray:
    """``α·z(r_cf) + (1−α)·z(r_cb)``, per user row, for score matrices (U, I).

    MF scores are unbounded dot products whose spread differs from user to user, while content
    scores are cosines squeezed into a narrow band (MiniLM cosines of item texts are mostly in
    0.2–0.6). Mixing raw scores would let whichever has the larger spread decide alone, with a
    different effective α for every user; standardising each row first makes α mean the same
    thing everywhere. The z-transform is increasing, so α=1 ranks exactly as ``r_cf`` and α=0
    exactly as ``r_cb``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    r_cf, r_cb = np.atleast_2d(r_cf), np.atleast_2d(r_cb)
    if r_cf.shape != r_cb.shape:
        raise ValueError(f"score matrices differ in shape: {r_cf.shape} vs {r_cb.shape}")
    if alpha == 1.0:
        return zscore_rows(r_cf)
    if alpha == 0.0:
        return zscore_rows(r_cb)
    return alpha * zscore_rows(r_cf) + (1.0 - alpha) * zscore_rows(r_cb)


def unit(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to norm 1 (each row when 2-D), as float64; a zero stays zero."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def user_profiles(user_train_items: Sequence[np.ndarray], text_vectors: np.ndarray) -> np.ndarray:
    """Each user's profile (U, d): the mean text vector of their training items (zeros for a
    user without any)."""
    text_vectors = np.asarray(text_vectors, dtype=np.float64)
    out = np.zeros((len(user_train_items), text_vectors.shape[1]))
    for u, items in enumerate(user_train_items):
        if len(items):
            out[u] = text_vectors[np.asarray(items, dtype=np.int64)].mean(axis=0)
    return out


def text_only_scores(user_train_items: Sequence[np.ndarray], text_vectors: np.ndarray) -> np.ndarray:
    """Content scores ``r_cb`` (U, I): cosine between each user's profile and each item's text
    vector. Needs no interaction with the item itself, so it scores cold items too; a user with
    no history gets a row of zeros."""
    profiles = unit(user_profiles(user_train_items, text_vectors))
    return profiles @ unit(text_vectors).T


def genre_popularity_scores(user_train_items: Sequence[np.ndarray], item_genres: Sequence[Sequence[str]],
                            item_counts: np.ndarray) -> np.ndarray:
    """Baseline: most-popular within the genres the user watched most, scores (U, I).

    ``share_u(g)`` is the fraction of user u's training items that carry genre g; an item's
    share is that of its best genre for the user, ``max_{g ∈ genres(i)} share_u(g)``; and

        score(u, i) = share_u(i) · log(1 + count_i) + 1e-6 · log(1 + count_i)

    where ``count_i`` is the item's number of training interactions (``item_genres`` are e.g.
    ``ItemInfo.genres``). The small second term only breaks ties by popularity, so items outside
    every genre of the user (share 0), items without genres and users without history fall
    back to plain MostPop order.
    """
    item_counts = np.asarray(item_counts, dtype=np.float64)
    if len(item_genres) != len(item_counts):
        raise ValueError(f"{len(item_genres)} item genre lists but {len(item_counts)} item counts")
    names = sorted({g for genres in item_genres for g in genres})
    column = {g: j for j, g in enumerate(names)}
    has = np.zeros((len(item_genres), len(names)), dtype=bool)  # (I, G) multi-hot
    for i, genres in enumerate(item_genres):
        has[i, [column[g] for g in genres]] = True
    share = np.zeros((len(user_train_items), len(names)))  # (U, G)
    for u, items in enumerate(user_train_items):
        if len(items):
            share[u] = has[np.asarray(items, dtype=np.int64)].mean(axis=0)
    best = np.zeros((len(user_train_items), len(item_genres)))
    for j in range(len(names)):  # max over each item's genres, one genre at a time: O(U·I) memory
        best = np.maximum(best, share[:, j:j + 1] * has[:, j][None, :])
    log_pop = np.log1p(item_counts)[None, :]
    return best * log_pop + 1e-6 * log_pop


def hybrid_item_params(free: ItemParams, text_vectors: np.ndarray, *, cold_items: np.ndarray | None = None,
                       cold_bias: float | None = None) -> ItemParams:
    """The hybrid item model in MF form: embeddings ``free + text``, biases from ``free``.

    Because the result is an ordinary :class:`ItemParams`, user reconstruction (``fit_user``)
    and ranking (``score_users``) work unchanged. ``cold_items`` (indices with no interactions)
    get a free embedding of 0, so they are placed by their text alone, and bias ``cold_bias``
    (default: the mean bias of the other items), since a bias cannot be learned without data.
    """
    text_vectors = np.asarray(text_vectors, dtype=np.float32)
    if text_vectors.shape != free.embeddings.shape:
        raise ValueError(f"text vectors {text_vectors.shape} must match the free embeddings {free.embeddings.shape}")
    embeddings = free.embeddings + text_vectors
    bias = free.bias.copy()
    if cold_items is not None and len(cold_items):
        cold = np.asarray(cold_items, dtype=np.int64)
        warm = np.ones(free.n_items, dtype=bool)
        warm[cold] = False
        if cold_bias is None:
            cold_bias = float(free.bias[warm].mean()) if warm.any() else 0.0
        embeddings[cold] = text_vectors[cold]
        bias[cold] = cold_bias
    return ItemParams(embeddings.astype(np.float32), bias.astype(np.float32))



def new_item_bias(bias: np.ndarray, text_embeddings: np.ndarray, new_items: np.ndarray, *,
                  lambdas: Sequence[float] = (0.1, 1.0, 10.0, 100.0), folds: int = 5, seed: int = 0
                  ) -> tuple[np.ndarray, float]:
    """Biases for items nobody has interacted with yet, predicted from their text.

    A ridge regression (intercept unpenalised) of the released biases of the other items on
    their sentence embeddings, λ chosen by ``folds``-fold cross-validation (mean squared error)
    among ``lambdas``. It reads only released parameters and public texts: post-processing,
    no privacy cost. Returns (predicted biases of the new items in increasing index order,
    chosen λ)."""
    X = np.asarray(text_embeddings, dtype=np.float64)
    y = np.asarray(bias, dtype=np.float64)
    new = np.zeros(len(y), dtype=bool)
    new[np.asarray(new_items, dtype=np.int64)] = True
    known = np.flatnonzero(~new)
    if len(known) < folds:
        raise ValueError(f"need at least {folds} items with a trained bias, got {len(known)}")
    W, b, lam, _ = ridge_cv(X[known], y[known, None], lambdas=lambdas, folds=folds, seed=seed)
    return (X[new] @ W + b)[:, 0].astype(np.float32), lam
