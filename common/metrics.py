"""Full-ranking metrics: every user's scores over all items, training items masked.

No sampled negatives: an item is ranked against every item the user has not trained on.
Per-user values are averaged over users that have at least one held-out item.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

RANKING_METRICS = ("hr", "recall", "ndcg", "mrr", "precision")


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def top_k(scores: np.ndarray, exclude: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Indices of the ``k`` best items per row (best first), ``exclude[b]`` never returned.

    ``scores`` is (B, I); ties are broken by the lower item index (deterministic).
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    for row, items in enumerate(exclude):
        scores[row, items] = -np.inf
    k = min(k, scores.shape[1])
    # A stable sort of the negated scores: equal scores keep the lower index first.
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def user_ranking_metrics(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Per-user HR/Recall/NDCG/MRR/Precision@k from top lists ``ranked`` (B, >=k).

    Users with no target get NaN (they are left out of averages).
    """
    ranked = ranked[:, :k]
    n = len(ranked)
    hits = np.zeros((n, ranked.shape[1]), dtype=bool)
    n_targets = np.array([len(t) for t in targets], dtype=np.float64)
    for row, t in enumerate(targets):
        if len(t):
            hits[row] = np.isin(ranked[row], t)
    disc = _discounts(ranked.shape[1])
    dcg = (hits * disc).sum(axis=1)
    ideal = np.array([disc[: int(min(m, k))].sum() for m in n_targets])
    first = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "hr": hits.any(axis=1).astype(np.float64),
            "recall": hits.sum(axis=1) / n_targets,
            "ndcg": dcg / ideal,
            "mrr": 1.0 / first,
            "precision": hits.sum(axis=1) / k,
        }
    empty = n_targets == 0
    for value in out.values():
        value[empty] = np.nan
    return out


def coverage(ranked: np.ndarray, n_items: int, k: int) -> float:
    """Fraction of the catalog that appears in at least one user's top-k."""
    return float(len(np.unique(ranked[:, :k])) / n_items)


def novelty(ranked: np.ndarray, item_popularity: np.ndarray, n_users: int, k: int) -> float:
    """Mean self-information −log2(pop_i / n_users) of recommended items (pop from training;
    an unseen item counts as seen once)."""
    pop = np.maximum(item_popularity[ranked[:, :k]], 1) / max(n_users, 1)
    return float(np.mean(-np.log2(pop)))


def rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    if len(actual) == 0:
        return float("nan")
    return float(np.sqrt(np.mean((np.asarray(predicted) - np.asarray(actual)) ** 2)))


def evaluate_scores(
    score_batches: Iterable[tuple[np.ndarray, np.ndarray]],
    exclude: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    *,
    n_items: int,
    item_popularity: np.ndarray,
    ks: Sequence[int] = (10, 20),
    new_items: np.ndarray | None = None,
) -> dict[str, float]:
    """Aggregate full-ranking metrics over users.

    ``score_batches`` yields ``(user_indices, scores (B, n_items))``; ``exclude[u]`` are the
    items masked for user ``u`` (training, and validation when testing) and ``targets[u]`` the
    held-out items. Returns ``{"ndcg@10": ..., "coverage@10": ..., "users": n}``; with
    ``new_items`` (item indices) also ``new_share@k``, the share of all top-k slots that went to
    those items (exposure of new items).
    """
    kmax = max(ks)
    per_user: dict[str, list[np.ndarray]] = {f"{m}@{k}": [] for m in RANKING_METRICS for k in ks}
    tops: list[np.ndarray] = []
    for users, scores in score_batches:
        keep = np.array([len(targets[u]) > 0 for u in users], dtype=bool)
        if not keep.any():
            continue
        users, scores = users[keep], scores[keep]
        ranked = top_k(scores, [exclude[u] for u in users], kmax)
        tops.append(ranked)
        for k in ks:
            for name, values in user_ranking_metrics(ranked, [targets[u] for u in users], k).items():
                per_user[f"{name}@{k}"].append(values)
    if not tops:
        return {"users": 0}
    ranked_all = np.concatenate(tops)
    n_users = len(exclude)
    out: dict[str, float] = {name: float(np.nanmean(np.concatenate(v))) for name, v in per_user.items()}
    for k in ks:
        out[f"coverage@{k}"] = coverage(ranked_all, n_items, k)
        out[f"novelty@{k}"] = novelty(ranked_all, item_popularity, n_users, k)
        if new_items is not None:
            out[f"new_share@{k}"] = float(np.isin(ranked_all[:, :k], np.asarray(new_items)).mean())
    out["users"] = len(ranked_all)
    return out


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def ratio_mean_ci95(sums: Sequence[float], users: Sequence[int], population: int) -> tuple[float, float | None]:
    """(mean per user, 95% CI half-width) of a metric from a uniform sample of clients drawn
    without replacement from ``population`` clients; client i returned the sum ``sums[i]`` of
    its users' values over ``users[i]`` users.

    The mean is the ratio estimator R = Σ sums / Σ users (each user weighted once, as with every
    client). Its variance (Cochran, *Sampling Techniques*, 6.9; clusters of unequal size):
    V(R) ≈ (1 − n/N) / (n · x̄²) · Σ (yᵢ − R·xᵢ)² / (n − 1), x̄ = Σ users / n. With one user per
    client it is the plain (1 − n/N) s²/n. The finite-population correction makes the width 0
    when every client was evaluated (n = N). The half-width is None with fewer than 2 clients
    (no variance to estimate); ValueError when no user was evaluated.
    """
    y, x = np.asarray(sums, dtype=np.float64), np.asarray(users, dtype=np.float64)
    n = len(y)
    if len(x) != n or x.sum() <= 0:
        raise ValueError(f"{n} sums over {len(x)} clients with {x.sum():g} users: no mean to estimate")
    if n > population:
        raise ValueError(f"{n} clients sampled from a population of {population}")
    mean = float(y.sum() / x.sum())
    if n < 2:
        return mean, None
    residual = y - mean * x
    variance = (1 - n / population) / (n * (x.sum() / n) ** 2) * float(residual @ residual) / (n - 1)
    return mean, float(Z95 * np.sqrt(max(variance, 0.0)))
