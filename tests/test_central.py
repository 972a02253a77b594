"""Centralised MF training (common.central) on a tiny synthetic data set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.central import train_central
from common.config import CentralConfig, ModelConfig
from common.data.dataset import build_interactions
from common.data.splits import Split, split_interactions
from common.evaluation import EvalSets, evaluate_ranking
from common.models.mf.params import init_items
from common.models.reconstruction import score_users

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def split() -> Split:
    """60 users in 5 taste groups over 50 items: each user picks 8 items of the group's 10 and
    2 anywhere else (noise), then a random 80/10/10 split per user."""
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(60):
        group = u % 5
        own = rng.choice(np.arange(group * 10, group * 10 + 10), size=8, replace=False)
        other = rng.choice(np.setdiff1d(np.arange(50), own), size=2, replace=False)
        for i in np.r_[own, other]:
            users.append(f"u{u:02d}")
            items.append(f"i{i:02d}")
    data = build_interactions("groups", users, items, None, None)
    return split_interactions(data, "random", seed=0)


def untrained_valid_ndcg(split: Split, model: ModelConfig, seed: int) -> float:
    """Validation NDCG@10 of a model at initialisation (the same initial scale as the trainer)."""
    sets = EvalSets.from_split(split)
    params = init_items(split.n_items, model.dim, seed=seed, scale=model.init_scale)
    vectors = (torch.randn(split.n_users, model.dim, generator=torch.Generator().manual_seed(seed))
               * model.init_scale).numpy()
    return evaluate_ranking(lambda users: score_users(params, vectors[users]), sets, "valid")["ndcg@10"]


@pytest.mark.parametrize("loss", ["softmax", "bpr"])
def test_train_central_improves_validation_ndcg(split, loss):
    model = ModelConfig(dim=8, loss=loss)
    cfg = CentralConfig(epochs=40, lr=0.05, batch_users=16, patience=4, eval_every=2)
    result = train_central(split, model, cfg, seed=0, progress=False)
    before = untrained_valid_ndcg(split, model, seed=0)
    assert result.best_epoch >= 1
    assert 0 <= result.seconds_to_best <= result.seconds
    assert result.valid["ndcg@10"] > before + 0.2, (before, result.valid["ndcg@10"])
    # the returned model is the best validation epoch's
    best_logged = max(row["valid_ndcg@10"] for row in result.history if "valid_ndcg@10" in row)
    assert result.valid["ndcg@10"] == pytest.approx(best_logged)
    assert result.params.embeddings.shape == (split.n_items, 8)
    assert result.user_vectors.shape == (split.n_users, 8)
    assert {"ndcg@10", "recall@10", "hr@10"} <= set(result.test)
