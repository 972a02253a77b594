"""Hybrid recommendation: collaborative filtering (MF) + item text (MiniLM vectors).

Three ways to use the text, from simplest to learned:

``blend_scores``         α·z(r_cf) + (1−α)·z(r_cb), a fixed mix of MF scores and content scores
``hybrid_item_params``   item vector = free embedding + projected text vector, scored by the
                         unchanged MF code; cold items (never interacted) are scored from text
``adapter_update``       one client's local step on the text side (LoRA + head) of that model

plus the cold-start scorers ``text_only_scores`` and the ``genre_popularity_scores`` baseline.
Content scores ``r_cb`` are cosines between a user's profile (mean text vector of their
training items) and every item's text vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from common.mf import ItemParams, UserData, sample_negatives
from common.text_encoder import TextItemEncoder, trainable_parameters, trainable_state


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


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
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
    profiles = _unit_rows(user_profiles(user_train_items, text_vectors))
    return profiles @ _unit_rows(np.asarray(text_vectors, dtype=np.float64)).T


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


def adapter_update(encoder: TextItemEncoder, free: ItemParams, user: UserData, item_tokens: dict[str, torch.Tensor],
                   *, user_vector: np.ndarray, negatives_rng: np.random.Generator, n_neg: int, lr: float,
                   epochs: int) -> tuple[dict[str, np.ndarray], float]:
    """One client's local training of the text side (LoRA + head) for one user.

    Each epoch samples ``n_neg`` negatives (uniform over the items the user has not seen),
    encodes only the user's positives and those negatives (from the pre-tokenised
    ``item_tokens``: ``input_ids``/``attention_mask`` rows for all items), scores them as
    ``s_i = u·(free_i + head(text_i)) + b_i`` and takes one SGD step on the sampled softmax
    loss ``logsumexp(s over positives ∪ negatives) − mean(s over positives)``. The free
    embeddings, biases and user vector stay fixed; the base model is frozen.

    Returns the update ``new − received`` of :func:`trainable_state` (same keys) and the loss
    before the last step. The encoder is left holding the trained weights (its training mode is
    restored); load the received state to undo. Cost: one forward/backward over
    ``len(user.items) + n_neg`` texts per epoch.
    """
    if len(user.items) == 0:
        raise ValueError("adapter_update needs a user with at least one training item")
    if epochs < 1 or n_neg < 1 or lr <= 0:
        raise ValueError(f"need epochs ≥ 1, n_neg ≥ 1 and lr > 0, got {epochs}, {n_neg}, {lr}")
    received = trainable_state(encoder)
    u = torch.as_tensor(np.asarray(user_vector, dtype=np.float32))
    V = torch.from_numpy(np.asarray(free.embeddings, dtype=np.float32))
    b = torch.from_numpy(np.asarray(free.bias, dtype=np.float32))
    pos = np.asarray(user.items, dtype=np.int64)
    optimizer = torch.optim.SGD(trainable_parameters(encoder), lr=lr)
    was_training = encoder.training
    encoder.train()
    loss_value = float("nan")
    try:
        for _ in range(epochs):
            neg = sample_negatives(pos, free.n_items, n_neg, negatives_rng)
            idx = torch.from_numpy(np.concatenate([pos, neg]))
            text = encoder(item_tokens["input_ids"][idx], item_tokens["attention_mask"][idx])
            scores = (V[idx] + text) @ u + b[idx]
            loss = torch.logsumexp(scores, 0) - scores[: len(pos)].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
    finally:
        encoder.train(was_training)
    new = trainable_state(encoder)
    return {k: new[k] - received[k] for k in received}, loss_value
