"""Reconstructable matrix factorisation (common.models): user solves, item gradients, a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.central import train_central
from common.config import CentralConfig, ModelConfig
from common.data.dataset import Interactions, build_interactions
from common.data.splits import Split
from common.evaluation import items_by_user
from common.models import ItemParams, UserData
from common.models.mf.params import init_items
from common.models.mf.train import local_item_update
from common.models.reconstruction import LOSSES, fit_user, item_loss, sample_negatives, score_users

torch.set_num_threads(1)

REG = 0.3


@pytest.fixture
def params() -> ItemParams:
    rng = np.random.default_rng(0)
    return ItemParams((rng.standard_normal((30, 5)) * 0.5).astype(np.float32),
                      (rng.standard_normal(30) * 0.3).astype(np.float32))


def make_user(seed: int, n_items: int = 30, n: int = 7) -> UserData:
    rng = np.random.default_rng(seed)
    return UserData(np.sort(rng.choice(n_items, size=n, replace=False)).astype(np.int64),
                    rng.integers(1, 6, size=n).astype(np.float32))


def negatives_for(user: UserData, loss: str, n_items: int, seed: int) -> np.ndarray | None:
    if loss != "bpr":
        return None
    return sample_negatives(user.items, n_items, len(user.items), np.random.default_rng(seed))


def objective_grad(params: ItemParams, user: UserData, u: np.ndarray, loss: str, reg: float,
                   negatives: np.ndarray | None) -> np.ndarray:
    """∇_u of ``item_loss + reg·|u|²`` at ``u``, by autograd in float64."""
    V = torch.from_numpy(params.embeddings).double()
    b = torch.from_numpy(params.bias).double()
    ut = torch.from_numpy(u.astype(np.float64)).requires_grad_(True)
    value = item_loss(V, b, ut, user, loss=loss, negatives=negatives) + reg * (ut @ ut)
    (grad,) = torch.autograd.grad(value, ut)
    return grad.numpy()


# ---------------------------------------------------------------- user reconstruction

@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fit_user_returns_the_minimiser(params, loss, seed):
    user = make_user(seed)
    negs = negatives_for(user, loss, params.n_items, seed)
    u = fit_user(params, user, loss=loss, reg=REG, negatives=negs)
    assert u.shape == (params.dim,) and u.dtype == np.float32
    grad = objective_grad(params, user, u, loss, REG, negs)
    # The objective is strictly convex in u, so a zero gradient means the minimum. u comes back
    # in float32: zero up to float32 rounding, against the gradient at the start (u = 0).
    assert np.linalg.norm(grad) < 1e-5 * max(1.0, np.linalg.norm(objective_grad(params, user, 0 * u, loss, REG, negs)))
    assert np.linalg.norm(u) > 1e-3  # not the trivial start


def test_fit_user_mse_is_ridge_closed_form(params):
    user = make_user(5)
    Vp = params.embeddings[user.items].astype(np.float64)
    r = user.ratings.astype(np.float64) - params.bias[user.items]
    ridge = np.linalg.solve(Vp.T @ Vp + REG * np.eye(params.dim), Vp.T @ r)
    np.testing.assert_allclose(fit_user(params, user, loss="mse", reg=REG), ridge, rtol=1e-5, atol=1e-6)


def test_fit_user_is_deterministic_and_refuses_bad_input(params):
    user = make_user(4)
    np.testing.assert_array_equal(fit_user(params, user, loss="softmax", reg=REG),
                                  fit_user(params, user, loss="softmax", reg=REG))
    with pytest.raises(ValueError, match="negatives"):
        fit_user(params, user, loss="bpr", reg=REG)
    with pytest.raises(ValueError, match="unknown loss"):
        fit_user(params, user, loss="hinge", reg=REG)


def test_sample_negatives_avoids_positives():
    pos = np.array([0, 3, 4], dtype=np.int64)
    negs = sample_negatives(pos, 6, 200, np.random.default_rng(0))
    assert len(negs) == 200 and not np.isin(negs, pos).any()
    assert set(negs.tolist()) == {1, 2, 5}


# ---------------------------------------------------------------- client item update

@pytest.mark.parametrize("loss", LOSSES)
def test_local_item_update_one_epoch_is_minus_lr_times_gradient(params, loss):
    users = [make_user(s) for s in (11, 12, 13)]
    before = params.copy()
    lr = 0.05
    update, mean_loss, vectors = local_item_update(params, users, loss=loss, user_reg=REG, epochs=1, lr=lr,
                                                   rng=np.random.default_rng(9))
    # the received parameters are left alone, the update has their shapes and dtypes
    np.testing.assert_array_equal(params.embeddings, before.embeddings)
    np.testing.assert_array_equal(params.bias, before.bias)
    assert update.embeddings.shape == params.embeddings.shape and update.bias.shape == params.bias.shape
    assert update.embeddings.dtype == np.float32 and update.bias.dtype == np.float32
    assert len(vectors) == len(users)

    # Reference: the same negatives (same rng, same order), users reconstructed independently,
    # autograd of the summed data loss w.r.t. the item parameters at those users.
    rng = np.random.default_rng(9)
    negs = [sample_negatives(u.items, params.n_items, len(u.items), rng) if loss == "bpr" else None for u in users]
    V = torch.from_numpy(params.embeddings.astype(np.float64)).requires_grad_(True)
    b = torch.from_numpy(params.bias.astype(np.float64)).requires_grad_(True)
    total = 0
    for user, neg, got in zip(users, negs, vectors):
        u = fit_user(params, user, loss=loss, reg=REG, negatives=neg)
        np.testing.assert_allclose(got, u, rtol=1e-6, atol=1e-7)
        total = total + item_loss(V, b, torch.from_numpy(u.astype(np.float64)), user, loss=loss, negatives=neg)
    total.backward()
    np.testing.assert_allclose(update.embeddings, -lr * V.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(update.bias, -lr * b.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert mean_loss == pytest.approx(float(total.detach()) / sum(len(u.items) for u in users), rel=1e-5)
    assert np.abs(update.embeddings).max() > 0


# ---------------------------------------------------------------- checkerboard known answer
#
# BLOCKS groups of users; group g's users interacted with the items of item block g only.
# One item per user is withheld (the diagonal of the block): a model that learnt the structure
# ranks, for each user, an item of their own block first once their training items are masked.

BLOCKS, USERS_PER_BLOCK, ITEMS_PER_BLOCK = 4, 6, 8


@pytest.fixture(scope="module")
def checkerboard() -> tuple[Split, np.ndarray]:
    """A split whose train holds each user's block minus one item (that item is valid and test);
    returns it with each user's block index."""
    rows, held = [], []
    for g in range(BLOCKS):
        for j in range(USERS_PER_BLOCK):
            user = g * USERS_PER_BLOCK + j
            block = range(g * ITEMS_PER_BLOCK, (g + 1) * ITEMS_PER_BLOCK)
            withheld = g * ITEMS_PER_BLOCK + j % ITEMS_PER_BLOCK
            for item in block:
                (held if item == withheld else rows).append((f"u{user:02d}", f"i{item:02d}"))
    every = rows + held
    data = build_interactions("checkerboard", [u for u, _ in every], [i for _, i in every], None, None)
    is_held = np.zeros(len(data), dtype=bool)
    held_keys = {(data.user_ids.index(u), data.item_ids.index(i)) for u, i in held}
    is_held[[k for k, (u, i) in enumerate(zip(data.user, data.item)) if (u, i) in held_keys]] = True
    empty = data.subset(np.zeros(len(data), dtype=bool))
    split = Split(train=data.subset(~is_held), valid=data.subset(is_held), test=data.subset(is_held),
                  cold_items=np.array([], dtype=np.int64), cold_test=empty, kind="random", seed=0)
    return split, np.arange(data.n_users) // USERS_PER_BLOCK


def top1_blocks(params: ItemParams, vectors: np.ndarray, train: Interactions) -> np.ndarray:
    scores = score_users(params, vectors).astype(np.float64)
    for user, items in enumerate(items_by_user(train)):
        scores[user, items] = -np.inf
    return scores.argmax(axis=1) // ITEMS_PER_BLOCK


def test_checkerboard_central(checkerboard):
    split, block = checkerboard
    result = train_central(split, ModelConfig(dim=8), CentralConfig(epochs=30, lr=0.05, batch_users=8,
                                                                     patience=30, eval_every=5), progress=False)
    np.testing.assert_array_equal(top1_blocks(result.params, result.user_vectors, split.train), block)


# mse is left out: fitted on observed positives only (all rated 1) it has nothing that tells
# a user's block apart from the others, so no ranking is implied.
@pytest.mark.parametrize("loss", ["softmax", "bpr"])
def test_checkerboard_federated_rounds(checkerboard, loss):
    """Repeated client updates (one user per client) averaged by the server, then plain SGD;
    users are reconstructed from the final item parameters alone."""
    split, block = checkerboard
    users = [UserData(items, np.ones(len(items), dtype=np.float32)) for items in items_by_user(split.train)]
    params = init_items(split.n_items, 8, seed=0, scale=0.1)
    rng = np.random.default_rng(0)
    for _ in range(40):
        updates = [local_item_update(params, [u], loss=loss, user_reg=0.1, epochs=1, lr=0.1, rng=rng)[0]
                   for u in users]
        params = ItemParams(params.embeddings + np.mean([u.embeddings for u in updates], axis=0) * 5,
                            params.bias + np.mean([u.bias for u in updates], axis=0) * 5)
    negs = [negatives_for(u, loss, split.n_items, k) for k, u in enumerate(users)]
    vectors = np.stack([fit_user(params, u, loss=loss, reg=0.1, negatives=n) for u, n in zip(users, negs)])
    np.testing.assert_array_equal(top1_blocks(params, vectors, split.train), block)
