"""What a device computes besides its model's training step, with no Flower in it: the protection
of an update before it leaves (clip by the model's groups, the device's own noise, a last check),
and the evaluation of its users (reconstructed here, ranked against every item they have not
trained on). The client app (client/app.py) and the in-process runner call these same functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.config import ModelConfig
from common.metrics import RANKING_METRICS, top_k, user_ranking_metrics
from common.models.contract import ClientData, ItemModel, ItemParams, UserData
from common.models.reconstruction import fit_user, sample_negatives
from common.privacy.device import Protection
from common.privacy.discrete_gaussian import RandomWords
from common.privacy.dp_fedavg import GaussianNoise, add_local_noise, local_bound
from common.rounds import validate_update
from common.streams import Stream, generator

EVAL_KS = (10, 20)


def protect(model: ItemModel, arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]], protection: Protection,
            *, noise: GaussianNoise, pooled_noise: bool = False) -> list[np.ndarray]:
    """The update as it may leave the device: clipped to ``protection.clip`` by the model's
    clipping groups, with the device's own Gaussian noise when ``protection.local_noise`` is set
    (clamped to ±C(1 + 8σ)), and refused (``ValueError``) if anything is still wrong with it --
    under SecAgg+ a NaN would silently corrupt the sum. Under distributed DP (``protection.distributed``)
    the clipped update is encoded with the device's own discrete noise share into one vector of
    field elements; ``pooled_noise`` (the in-process simulation only) leaves the share out for the
    runner to draw the cohort's noise at once."""
    arrays = list(arrays)
    bound = protection.clip
    if np.isfinite(bound):
        arrays = model.clip(arrays, bound, protection.bias_share)
    if protection.distributed is not None:
        return [_encode_distributed(arrays, shapes, protection.distributed, noise, add_noise=not pooled_noise)]
    if protection.local_noise is not None:
        arrays = add_local_noise(arrays, noise_multiplier=protection.local_noise, clip=bound, noise=noise)
        bound = local_bound(protection.local_noise, bound)
    problem = validate_update(arrays, list(shapes), bound)
    if problem:
        raise ValueError(f"update refused: {problem}")
    return arrays


def _encode_distributed(arrays: list[np.ndarray], shapes: Sequence[tuple[int, ...]], mechanism, noise: GaussianNoise,
                        *, add_noise: bool) -> np.ndarray:
    """Distributed DP: the clipped update, checked, then rotated, rounded, noised with the device's
    own discrete Gaussian share (OS CSPRNG unless the owner seeded the device) and reduced modulo
    the field: one uint64 vector of the padded length."""
    problem = validate_update(arrays, list(shapes))
    if problem:
        raise ValueError(f"update refused: {problem}")
    flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    if flat.size != mechanism.params.dim:
        raise ValueError(f"update refused: {flat.size} values, the round's mechanism is for {mechanism.params.dim}")
    words = None if noise.secure else RandomWords(noise.seed)
    return mechanism.encode(flat, src=words, add_noise=add_noise)


def reconstruct_users(params: ItemParams, users: list[UserData], model: ModelConfig, *, seed: int) -> np.ndarray:
    """User vectors fitted to the current item parameters (deterministic for a seed)."""
    rng = generator(Stream.RECONSTRUCT, seed)
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

