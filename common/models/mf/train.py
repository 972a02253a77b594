"""The MF device step: reconstruct each user, one gradient step on the item parameters."""

from __future__ import annotations

import numpy as np
import torch

from common.models.contract import ItemParams, UserData
from common.models.reconstruction import fit_user, item_loss, sample_negatives


def local_item_update(params: ItemParams, users: list[UserData], *, loss: str, user_reg: float,
                      epochs: int, lr: float, rng: np.random.Generator) -> tuple[ItemParams, float, list[np.ndarray]]:
    """Client training: ``epochs`` rounds of (reconstruct each user, one gradient step on the
    item parameters). Returns the update (new − received, dense, same shapes), the mean data
    loss per interaction before the last step, and the users' final vectors (kept on device)."""
    V = torch.from_numpy(params.embeddings.copy()).requires_grad_(True)
    b = torch.from_numpy(params.bias.copy()).requires_grad_(True)
    n_inter = max(sum(len(u.items) for u in users), 1)
    last_loss = float("nan")
    vectors: list[np.ndarray] = []
    for _ in range(epochs):
        current = ItemParams(V.detach().numpy(), b.detach().numpy())
        negs = [sample_negatives(u.items, params.n_items, len(u.items), rng) if loss == "bpr" else None for u in users]
        vectors = [fit_user(current, u, loss=loss, reg=user_reg, negatives=n) for u, n in zip(users, negs)]
        total = sum(item_loss(V, b, torch.from_numpy(vec), u, loss=loss, negatives=n)
                    for vec, u, n in zip(vectors, users, negs))
        V.grad = b.grad = None
        total.backward()
        with torch.no_grad():
            V -= lr * V.grad
            b -= lr * b.grad
        last_loss = float(total.detach()) / n_inter
    update = ItemParams(V.detach().numpy() - params.embeddings, b.detach().numpy() - params.bias)
    return update, last_loss, vectors
