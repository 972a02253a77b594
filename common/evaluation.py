"""Evaluation protocol shared by the central trainer, the federated clients and benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from common.data.dataset import Interactions
from common.data.splits import Split
from common.metrics import evaluate_scores


def items_by_user(data: Interactions) -> list[np.ndarray]:
    """Sorted item indices of each user (an empty array for a user with none)."""
    order = np.lexsort((data.item, data.user))
    counts = np.bincount(data.user, minlength=data.n_users)
    return np.split(data.item[order].astype(np.int64), np.cumsum(counts)[:-1])


def ratings_by_user(data: Interactions) -> list[np.ndarray]:
    order = np.lexsort((data.item, data.user))
    counts = np.bincount(data.user, minlength=data.n_users)
    return np.split(data.rating[order].astype(np.float32), np.cumsum(counts)[:-1])


@dataclass(frozen=True)
class EvalSets:
    """Per-user item lists for one split: what to train on, mask and rank against."""

    train: list[np.ndarray]
    valid: list[np.ndarray]
    test: list[np.ndarray]
    train_ratings: list[np.ndarray]
    popularity: np.ndarray  # training interactions per item
    n_items: int

    @classmethod
    def from_split(cls, split: Split) -> "EvalSets":
        return cls(
            train=items_by_user(split.train),
            valid=items_by_user(split.valid),
            test=items_by_user(split.test),
            train_ratings=ratings_by_user(split.train),
            popularity=np.bincount(split.train.item, minlength=split.n_items),
            n_items=split.n_items,
        )

    def exclude_and_targets(self, phase: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """RecBole's convention: validation masks train; test masks train and validation."""
        if phase == "valid":
            return self.train, self.valid
        if phase == "test":
            return [np.union1d(t, v) for t, v in zip(self.train, self.valid)], self.test
        raise ValueError(f"phase must be 'valid' or 'test', got {phase!r}")


def evaluate_ranking(score_fn: Callable[[np.ndarray], np.ndarray], sets: EvalSets, phase: str, *,
                     users: Sequence[int] | None = None, ks: Sequence[int] = (10, 20),
                     batch: int = 256) -> dict[str, float]:
    """Full-ranking metrics of ``score_fn(user_indices) -> scores (B, I)`` on ``phase``."""
    exclude, targets = sets.exclude_and_targets(phase)
    users = np.arange(len(sets.train)) if users is None else np.asarray(users)

    def batches():
        for start in range(0, len(users), batch):
            chunk = users[start:start + batch]
            yield chunk, score_fn(chunk)

    return evaluate_scores(batches(), exclude, targets, n_items=sets.n_items,
                           item_popularity=sets.popularity, ks=ks)
