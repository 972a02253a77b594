"""User reconstruction, shared by every item model: a user's vector is never sent anywhere;
given the item side (any model's effective :class:`~common.models.contract.ItemParams`) and
the user's own items it is *reconstructed* by solving a small convex problem (as ``implicit``'s
``recalculate_user`` and TFF's Federated Reconstruction do). Losses:

``softmax``  full softmax over all items (multinomial likelihood of the user's positives)
``bpr``      Bayesian personalised ranking with sampled negatives
``mse``      squared error on explicit ratings

All three are convex in ``u`` for fixed item parameters, so the reconstruction is a
deterministic Newton solve from zero: a client needs no state to train or evaluate.
"""

from __future__ import annotations

import numpy as np
import torch

from common.choices import Loss, values
from common.models.contract import ItemParams, UserData

LOSSES = values(Loss)


def sample_negatives(positives: np.ndarray, n_items: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` items the user has not interacted with, uniformly (with replacement)."""
    mask = np.ones(n_items, dtype=bool)
    mask[positives] = False
    candidates = np.flatnonzero(mask)
    return candidates[rng.integers(0, len(candidates), size=n)]


def _newton(grad_hess, dim: int, *, iters: int, tol: float) -> torch.Tensor:
    """Minimise a smooth convex function of ``u`` from zero with damped Newton steps."""
    u = torch.zeros(dim, dtype=torch.float64)
    for _ in range(iters):
        value, grad, hess = grad_hess(u)
        if float(grad.norm()) < tol:
            break
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-4:  # backtracking line search: the objective must decrease
            candidate = u - t * step
            if grad_hess(candidate, value_only=True) <= value - 1e-4 * t * float(grad @ step):
                break
            t *= 0.5
        u = u - t * step
    return u


def fit_user(params: ItemParams, user: UserData, *, loss: str, reg: float,
             negatives: np.ndarray | None = None, iters: int = 20, tol: float = 1e-6) -> np.ndarray:
    """The user's vector minimising ``loss + reg·|u|²`` with item parameters fixed."""
    V = torch.from_numpy(params.embeddings).double()
    b = torch.from_numpy(params.bias).double()
    pos = torch.from_numpy(user.items)
    eye = torch.eye(V.shape[1], dtype=torch.float64)
    if loss == "mse":
        Vp = V[pos]
        r = torch.from_numpy(user.ratings).double() - b[pos]
        u = torch.linalg.solve(Vp.T @ Vp + reg * eye, Vp.T @ r)
        return u.numpy().astype(np.float32)
    if loss == "softmax":
        n = float(len(user.items))
        y = torch.zeros(V.shape[0], dtype=torch.float64)
        y[pos] = 1.0

        def grad_hess(u, value_only=False):
            s = V @ u + b
            lse = torch.logsumexp(s, 0)
            value = float(n * lse - s[pos].sum() + reg * (u @ u))
            if value_only:
                return value
            p = torch.softmax(s, 0)
            g = V.T @ (n * p - y) + 2 * reg * u
            vp = V.T @ p
            h = n * ((V.T * p) @ V - torch.outer(vp, vp)) + 2 * reg * eye
            return value, g, h
    elif loss == "bpr":
        if negatives is None:
            raise ValueError("bpr reconstruction needs the sampled negatives (one per positive)")
        neg = torch.from_numpy(negatives)
        X = V[pos] - V[neg]
        c = b[pos] - b[neg]

        def grad_hess(u, value_only=False):
            z = X @ u + c
            value = float(torch.nn.functional.softplus(-z).sum() + reg * (u @ u))
            if value_only:
                return value
            g = -(X.T @ torch.sigmoid(-z)) + 2 * reg * u
            w = torch.sigmoid(z) * torch.sigmoid(-z)
            h = (X.T * w) @ X + 2 * reg * eye
            return value, g, h
    else:
        raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    return _newton(grad_hess, V.shape[1], iters=iters, tol=tol).numpy().astype(np.float32)


def item_loss(V: torch.Tensor, b: torch.Tensor, u: torch.Tensor, user: UserData, *, loss: str,
              negatives: np.ndarray | None = None) -> torch.Tensor:
    """One user's data loss as a differentiable function of the item parameters."""
    pos = torch.from_numpy(user.items)
    if loss == "softmax":
        s = V @ u + b
        return len(user.items) * torch.logsumexp(s, 0) - s[pos].sum()
    if loss == "bpr":
        neg = torch.from_numpy(negatives)
        z = (V[pos] - V[neg]) @ u + b[pos] - b[neg]
        return torch.nn.functional.softplus(-z).sum()
    if loss == "mse":
        pred = V[pos] @ u + b[pos]
        return ((pred - torch.from_numpy(user.ratings)) ** 2).sum()
    raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")


def score_users(params: ItemParams, user_vectors: np.ndarray) -> np.ndarray:
    """Scores (B, I) of users (B, d) over all items."""
    return user_vectors @ params.embeddings.T + params.bias
