"""The text-first item tower: every item's vector is ``tower(text) + residual``.

The tower maps an item's sentence embedding (frozen MiniLM, 384 values) to a full item — its
vector (``dim``) *and* its bias — with one linear map fitted so that the text part alone is the
best linear predictor of the released full item vectors of the items that have interactions
(ALDI-style alignment of the text tower to the warm items' vectors; Huang et al., SIGIR 2023).
The free ID part is then the residual ``full − tower(text)``: warm items are scored exactly as
the released model scores them (the split is a re-parametrisation, not a change), and an item
nobody has interacted with yet — its residual is 0 — is scored on the same scale as the warm
items from its text alone, bias included. No separate mapping network: the tower *is* the head
of the item side, refitted after training.

What it reads: the released item vectors and biases (already differentially private) and the
public catalogue texts. Fitting it is post-processing: no privacy cost, no device involved.

``new_item_boost`` adds a constant to the predicted biases of new items. A ridge regression
pulls predictions to the mean, and an item's trained bias reflects its interactions *so far*; a
new item's future interactions are not in it. The boost is the deployer's exposure policy, not
something the training data can pick (no validation interaction of a new item exists); the
language-model benchmark shows the whole curve (exposure, warm, new and overall NDCG).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.models.contract import ItemParams

LAMBDAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass(frozen=True)
class TextTower:
    """``[vector, bias] = embedding @ weight + intercept``: weight (384, dim + 1)."""

    weight: np.ndarray
    intercept: np.ndarray
    ridge: float  # the λ cross-validation chose
    cv_r2: float  # held-out share of the warm items' variance the text explains (diagnostic)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1]) - 1

    def predict(self, embeddings: np.ndarray) -> ItemParams:
        """The text part of each item: vectors (n, dim) and biases (n,), from sentence embeddings (n, 384)."""
        out = np.asarray(embeddings, dtype=np.float64) @ self.weight + self.intercept
        return ItemParams(out[:, :-1].astype(np.float32), out[:, -1].astype(np.float32))


def _solve(X: np.ndarray, Y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge with an unpenalised intercept: centre, solve, recover the intercept."""
    mx, my = X.mean(axis=0), Y.mean(axis=0)
    Xc = X - mx
    W = np.linalg.solve(Xc.T @ Xc + lam * np.eye(X.shape[1]), Xc.T @ (Y - my))
    return W, my - mx @ W


def ridge_cv(X: np.ndarray, Y: np.ndarray, *, lambdas: Sequence[float] = LAMBDAS, folds: int = 5,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Ridge regression of ``Y`` (n, k) on ``X`` (n, p), intercept unpenalised, λ among
    ``lambdas`` by ``folds``-fold cross-validation (summed squared error over all targets).
    Returns (weight (p, k), intercept (k,), λ, held-out share of Y's variance explained)."""
    fold = np.random.default_rng(seed).permutation(len(X)) % folds
    errors = []
    for lam in lambdas:
        err = 0.0
        for f in range(folds):
            W, b = _solve(X[fold != f], Y[fold != f], lam)
            err += float(np.sum((X[fold == f] @ W + b - Y[fold == f]) ** 2))
        errors.append(err)
    best = int(np.argmin(errors))
    W, b = _solve(X, Y, float(lambdas[best]))
    total = float(np.sum((Y - Y.mean(axis=0)) ** 2))
    return W, b, float(lambdas[best]), 1.0 - errors[best] / total if total > 0 else 0.0


def fit_text_tower(full: ItemParams, embeddings: np.ndarray, known_items: np.ndarray, *,
                   lambdas: Sequence[float] = LAMBDAS, folds: int = 5, seed: int = 0) -> TextTower:
    """Fit the tower on the items in ``known_items`` (those with interactions): their released
    vectors and biases regressed on their sentence embeddings, λ by ``folds``-fold
    cross-validation (squared error over vector and bias together)."""
    X = np.asarray(embeddings, dtype=np.float64)
    if X.ndim != 2 or len(X) != full.n_items:
        raise ValueError(f"need one sentence embedding per item: {full.n_items} items, embeddings {X.shape}")
    known = np.unique(np.asarray(known_items, dtype=np.int64))
    if len(known) < max(folds, 2):
        raise ValueError(f"the text tower needs at least {max(folds, 2)} items with interactions, got {len(known)}")
    Y = np.c_[full.embeddings, full.bias].astype(np.float64)[known]
    return TextTower(*ridge_cv(X[known], Y, lambdas=lambdas, folds=folds, seed=seed))


def text_first_items(full: ItemParams, tower: TextTower, embeddings: np.ndarray, new_items: np.ndarray, *,
                     new_item_boost: float = 0.0) -> ItemParams:
    """The served item side: warm items exactly as released (``tower(text) + residual``), new
    items (``new_items``: no interaction in training) ``tower(text)`` with the residual 0 and
    their predicted bias raised by ``new_item_boost``."""
    new = np.unique(np.asarray(new_items, dtype=np.int64))
    if len(new) and (new[0] < 0 or new[-1] >= full.n_items):
        raise ValueError(f"new item indices must be in [0, {full.n_items}), got {new[0]}..{new[-1]}")
    if tower.dim != full.dim:
        raise ValueError(f"the tower predicts {tower.dim}-dimensional vectors, the model has {full.dim}")
    text = tower.predict(np.asarray(embeddings)[new])
    vectors, bias = full.embeddings.copy(), full.bias.copy()
    vectors[new] = text.embeddings
    bias[new] = text.bias + np.float32(new_item_boost)
    return ItemParams(vectors, bias)


def residuals(full: ItemParams, tower: TextTower, embeddings: np.ndarray) -> ItemParams:
    """The free ID part of every item, ``full − tower(text)`` (what the text does not explain)."""
    text = tower.predict(embeddings)
    return ItemParams(full.embeddings - text.embeddings, full.bias - text.bias)
