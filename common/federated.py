"""Federated learning logic with no Flower in it: what a client computes each round, and how the
server turns the aggregated update into the next global model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config import DPConfig, FedConfig, ModelConfig
from common.evaluation import EvalSets
from common.metrics import RANKING_METRICS, top_k, user_ranking_metrics
from common.mf import ItemParams, UserData, fit_user, local_item_update, sample_negatives
from common.privacy.dp_fedavg import GaussianNoise, noisy_mean

EVAL_KS = (10, 20)


def client_rng(seed: int, server_round: int, client_id: int) -> np.random.Generator:
    """The client's randomness for one round: reproducible, independent across clients/rounds."""
    return np.random.default_rng([seed, server_round, client_id])


@dataclass(frozen=True)
class ClientData:
    """What one client (a device with one user, or a silo) holds: its users' items."""

    client_id: int
    users: tuple[int, ...]
    train: tuple[UserData, ...]
    valid: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]

    @classmethod
    def from_sets(cls, client_id: int, users: np.ndarray, sets: EvalSets) -> "ClientData":
        return cls(
            client_id=client_id,
            users=tuple(int(u) for u in users),
            train=tuple(UserData(sets.train[u], sets.train_ratings[u]) for u in users),
            valid=tuple(sets.valid[u] for u in users),
            test=tuple(sets.test[u] for u in users),
        )

    @property
    def trainable(self) -> tuple[UserData, ...]:
        return tuple(u for u in self.train if len(u.items) > 0)


def client_train(params: ItemParams, data: ClientData, *, model: ModelConfig, epochs: int, lr: float,
                 seed: int, server_round: int) -> tuple[ItemParams, float, list[np.ndarray]]:
    """One client's round: the dense item-side update, its mean training loss and the user
    vectors (to keep on the device). Raises ``ValueError`` for a client with no interactions."""
    users = list(data.trainable)
    if not users:
        raise ValueError(f"client {data.client_id} has no training interactions")
    return local_item_update(params, users, loss=model.loss, user_reg=model.user_reg, epochs=epochs,
                             lr=lr, rng=client_rng(seed, server_round, data.client_id))


def reconstruct_users(params: ItemParams, users: list[UserData], model: ModelConfig, *, seed: int) -> np.ndarray:
    """User vectors fitted to the current item parameters (deterministic for a seed)."""
    rng = np.random.default_rng([seed, 0xE7A1])
    out = []
    for user in users:
        neg = sample_negatives(user.items, params.n_items, len(user.items), rng) if model.loss == "bpr" else None
        out.append(fit_user(params, user, loss=model.loss, reg=model.user_reg, negatives=neg))
    return np.stack(out) if out else np.zeros((0, params.dim), dtype=np.float32)


def client_evaluate(params: ItemParams, data: ClientData, *, model: ModelConfig, phase: str,
                    seed: int) -> dict[str, float]:
    """Full-ranking metrics of this client's users: sums over evaluated users plus their count
    (the server divides, giving the per-user average a central evaluation gives)."""
    sums: dict[str, float] = {f"{m}@{k}": 0.0 for m in RANKING_METRICS for k in EVAL_KS}
    keep = [i for i, u in enumerate(data.train) if len(u.items) > 0
            and len(data.valid[i] if phase == "valid" else data.test[i]) > 0]
    if not keep:
        return {**sums, "users": 0}
    vectors = reconstruct_users(params, [data.train[i] for i in keep], model, seed=seed)
    scores = vectors @ params.embeddings.T + params.bias
    exclude = [data.train[i].items if phase == "valid" else np.union1d(data.train[i].items, data.valid[i]) for i in keep]
    targets = [data.valid[i] if phase == "valid" else data.test[i] for i in keep]
    ranked = top_k(scores, exclude, max(EVAL_KS))
    for k in EVAL_KS:
        for name, values in user_ranking_metrics(ranked, targets, k).items():
            sums[f"{name}@{k}"] = float(np.sum(values))
    return {**sums, "users": len(keep)}


# ---------------------------------------------------------------- server side

class ServerOptimizer:
    """Applies the aggregated client update to the global parameters.

    The aggregated update Δ (mean of ``new − received``) is a pseudo-gradient ``g = −Δ``;
    ``sgd`` steps ``x ← x − lr·g`` (lr = 1 is plain FedAvg), ``adam`` is FedAdam (Reddi et al.
    2021). ``weight_decay`` is the item-side L2 prior, applied here because it needs no user
    data. State (moments, step) is checkpointed with :meth:`state_dict`.
    """

    def __init__(self, kind: str, lr: float, *, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        if kind not in ("adam", "sgd"):
            raise ValueError(f"unknown server optimizer {kind!r}")
        self.kind, self.lr, self.weight_decay, self.betas, self.eps = kind, lr, weight_decay, betas, eps
        self.step_count = 0
        self.m: list[np.ndarray] = []
        self.v: list[np.ndarray] = []

    def step(self, params: list[np.ndarray], update: list[np.ndarray]) -> list[np.ndarray]:
        self.step_count += 1
        grads = [-np.asarray(u, dtype=np.float64) for u in update]
        if self.kind == "sgd":
            return [(p - self.lr * g - self.lr * self.weight_decay * p).astype(np.float32) for p, g in zip(params, grads)]
        if not self.m:
            self.m = [np.zeros_like(g) for g in grads]
            self.v = [np.zeros_like(g) for g in grads]
        b1, b2 = self.betas
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            m_hat = self.m[i] / (1 - b1 ** self.step_count)
            v_hat = self.v[i] / (1 - b2 ** self.step_count)
            new = p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps) - self.lr * self.weight_decay * p
            out.append(new.astype(np.float32))
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"step": np.array([self.step_count], dtype=np.int64)}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            state[f"m{i}"], state[f"v{i}"] = m, v
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.step_count = int(state["step"][0])
        n = sum(1 for k in state if k.startswith("m"))
        self.m = [np.asarray(state[f"m{i}"]) for i in range(n)]
        self.v = [np.asarray(state[f"v{i}"]) for i in range(n)]


def make_server_optimizer(fed: FedConfig, model: ModelConfig) -> ServerOptimizer:
    return ServerOptimizer(fed.server_opt, fed.server_lr, weight_decay=model.item_reg)


def server_update(params: ItemParams, total: list[np.ndarray] | None, n: int, *, optimizer: ServerOptimizer,
                  dp: DPConfig | None, expected_cohort: float, noise: GaussianNoise) -> ItemParams:
    """The next global model from one round's sum of (clipped) client updates.

    ``total`` is None when nobody reported. Without DP: the mean over the ``n`` reporters (an
    empty round leaves the model unchanged). With DP: Gaussian noise once on the sum, divided by
    the expected cohort ``q·N`` (also when nobody reported: the release still happens)."""
    arrays = server_update_arrays(params.to_arrays(), total, n, optimizer=optimizer, dp=dp,
                                  expected_cohort=expected_cohort, noise=noise)
    return params if arrays is None else ItemParams.from_arrays(arrays)


def server_update_arrays(arrays: list[np.ndarray], total: list[np.ndarray] | None, n: int, *,
                         optimizer: ServerOptimizer, dp: DPConfig | None, expected_cohort: float,
                         noise: GaussianNoise) -> list[np.ndarray] | None:
    """:func:`server_update` on a list of arrays (any model's trainable arrays, in travel
    order); None when the model stays unchanged (no DP and nobody reported)."""
    if dp is None:
        if total is None or n == 0:
            return None
        mean = [np.asarray(t, dtype=np.float64) / n for t in total]
    else:
        if total is None:
            total = [np.zeros(a.shape) for a in arrays]
        mean = noisy_mean(total, noise_multiplier=dp.noise_multiplier, clip=dp.clip,
                          expected_cohort=expected_cohort, noise=noise)
    return optimizer.step(arrays, mean)


def sum_updates(updates: list[list[np.ndarray]]) -> list[np.ndarray] | None:
    """Sum of client updates in float64, in the given order (callers sort by client id, so the
    result does not depend on which reply arrived first). None when there are none."""
    if not updates:
        return None
    return [np.sum([u[i].astype(np.float64) for u in updates], axis=0) for i in range(len(updates[0]))]


def validate_update(arrays: list[np.ndarray], shapes: list[tuple[int, ...]], bound: float = np.inf, *,
                    l2: float = np.inf, bias_share: float = 0.0) -> str | None:
    """Why an update cannot be aggregated, or None: a wrong count or shape, NaN/Inf, a value
    outside ±``bound``, an L2 norm above ``l2``, or (``bias_share`` > 0, per-group clipping) the
    bias group (array 1) above ``l2·√share`` or the other arrays together above ``l2·√(1−share)``.
    Used by the client before masking and by the server after receiving a plaintext update."""
    if len(arrays) != len(shapes):
        return f"{len(arrays)} arrays, expected {len(shapes)}"
    for i, (a, shape) in enumerate(zip(arrays, shapes)):
        if tuple(np.shape(a)) != tuple(shape):
            return f"array {i} has shape {tuple(np.shape(a))}, expected {tuple(shape)}"
        if not np.all(np.isfinite(a)):
            return f"array {i} contains NaN or Inf"
        if np.size(a) and float(np.max(np.abs(a))) > bound * (1 + 1e-6):
            return f"array {i} has a value of magnitude {float(np.max(np.abs(a))):.4g} > {bound:.4g}"
    if np.isfinite(l2):
        groups = [("the update", arrays, l2)]
        if 0 < bias_share < 1 and len(arrays) > 1:
            groups += [("the bias group", [arrays[1]], l2 * np.sqrt(bias_share)),
                       ("the other arrays", [arrays[0], *arrays[2:]], l2 * np.sqrt(1.0 - bias_share))]
        for name, group, limit in groups:
            norm = float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in group)))
            if norm > limit * (1 + 1e-5):
                return f"{name} has L2 norm {norm:.4g} > {limit:.4g}"
    return None
