"""Centralised training of the same MF model: the baseline every federated number is compared to."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from common.config import CentralConfig, ModelConfig
from common.data.splits import Split
from common.evaluation import EvalSets, evaluate_ranking
from common.models import ItemParams
from common.models.mf.params import init_items

log = logging.getLogger(__name__)


@dataclass
class CentralResult:
    params: ItemParams
    user_vectors: np.ndarray
    best_epoch: int
    seconds_to_best: float
    seconds: float
    valid: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, float]]


def _batch_loss(S: torch.Tensor, Y: torch.Tensor, R: torch.Tensor, loss: str, rng: torch.Generator) -> torch.Tensor:
    """Summed data loss of a batch of users. ``Y`` marks training items, ``R`` their ratings."""
    if loss == "softmax":
        return (Y.sum(1) * torch.logsumexp(S, 1) - (S * Y).sum(1)).sum()
    if loss == "mse":
        return (((S - R) ** 2) * Y).sum()
    # bpr: one uniformly sampled negative per positive
    users, pos = Y.nonzero(as_tuple=True)
    neg = torch.randint(0, S.shape[1], (len(pos),), generator=rng)
    ok = Y[users, neg] == 0
    z = S[users[ok], pos[ok]] - S[users[ok], neg[ok]]
    return torch.nn.functional.softplus(-z).sum()


def train_central(split: Split, model: ModelConfig, cfg: CentralConfig, *, seed: int = 0,
                  progress: bool = True) -> CentralResult:
    """Joint Adam on user and item parameters over user mini-batches, early-stopped on
    validation NDCG@10 (RecBole protocol: validation masks train, test masks train+valid)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sets = EvalSets.from_split(split)
    n_users, n_items = split.n_users, split.n_items
    init = init_items(n_items, model.dim, seed=seed, scale=model.init_scale)
    U = torch.nn.Parameter(torch.randn(n_users, model.dim, generator=gen) * model.init_scale)
    V = torch.nn.Parameter(torch.from_numpy(init.embeddings.copy()))
    b = torch.nn.Parameter(torch.from_numpy(init.bias.copy()))
    Y = torch.zeros(n_users, n_items)
    R = torch.zeros(n_users, n_items)
    tu, ti = torch.from_numpy(split.train.user), torch.from_numpy(split.train.item)
    Y[tu, ti] = 1.0
    R[tu, ti] = torch.from_numpy(split.train.rating)
    if model.loss == "mse":
        with torch.no_grad():
            b.fill_(float(split.train.rating.mean()))
    opt = torch.optim.Adam([U, V, b], lr=cfg.lr)

    def scores(users: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (U[torch.from_numpy(users)] @ V.T + b).numpy()

    best = (-1.0, 0, None, 0.0)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bad = 0
    bar = tqdm(range(1, cfg.epochs + 1), desc="central MF", disable=not progress, unit="epoch")
    for epoch in bar:
        perm = torch.randperm(n_users, generator=gen)
        total = 0.0
        for s in range(0, n_users, cfg.batch_users):
            idx = perm[s:s + cfg.batch_users]
            S = U[idx] @ V.T + b
            data = _batch_loss(S, Y[idx], R[idx], model.loss, gen)
            # Per-interaction data loss + the same L2 prior a federated run uses.
            obj = data / Y[idx].sum().clamp(min=1) + model.item_reg * (
                (U[idx] ** 2).sum() + (V ** 2).sum() * len(idx) / n_users)
            opt.zero_grad()
            obj.backward()
            opt.step()
            total += float(data.detach())
        row = {"epoch": epoch, "loss": total / float(Y.sum())}
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            valid = evaluate_ranking(scores, sets, "valid")
            row["valid_ndcg@10"] = valid["ndcg@10"]
            if valid["ndcg@10"] > best[0]:
                state = (V.detach().clone(), b.detach().clone(), U.detach().clone())
                best, bad = (valid["ndcg@10"], epoch, state, time.perf_counter() - start), 0
            else:
                bad += 1
            bar.set_postfix(loss=f"{row['loss']:.3f}", ndcg10=f"{valid['ndcg@10']:.4f}", best=f"{best[0]:.4f}")
            if bad >= cfg.patience:
                history.append(row)
                break
        history.append(row)
    seconds = time.perf_counter() - start
    Vb, bb, Ub = best[2]
    with torch.no_grad():
        U.copy_(Ub), V.copy_(Vb), b.copy_(bb)
    params = ItemParams(Vb.numpy().copy(), bb.numpy().copy())
    return CentralResult(
        params=params,
        user_vectors=Ub.numpy().copy(),
        best_epoch=best[1],
        seconds_to_best=best[3],
        seconds=seconds,
        valid=evaluate_ranking(scores, sets, "valid"),
        test=evaluate_ranking(scores, sets, "test"),
        history=history,
    )
