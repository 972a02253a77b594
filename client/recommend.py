"""Recommendations on the device: a model file read and checked, the user's vector fitted
against it (torch, only when no cached vector fits), and the items ranked with a reason.

Used by ``fedrec-client recommend`` (:mod:`client.cli`) and the edge benchmark. Every damaged
input (a NaN model, a vector or score that is not finite, a bad ``config.json`` beside the model)
is a :class:`~common.cli.UsageError` or ``ValueError`` naming it, never a shorter list.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.store import GlobalModel, MappedRatings, non_finite, user_vector_fingerprint
from common.cli import UsageError
from common.data.items_file import read_items_file
from common.keys import ITEM_PARAM_NAMES
from common.serialization import load_arrays


@dataclass(frozen=True)
class Recommendation:
    item: int  # index in the model
    score: float
    because: int  # index of the most similar item the user liked
    similarity: float  # cosine of the two item embeddings


def rank_items(model: GlobalModel, vector: np.ndarray, rated: MappedRatings, k: int,
               exclude: Sequence[int] = ()) -> list[Recommendation]:
    """Top-``k`` items by ``u·v + b``, rated and ``exclude``d items left out, each with the liked
    item (rating ≥ the user's mean rating) whose embedding is most similar (cosine). A score
    that is NaN or Inf (a damaged model or vector) is a ValueError, never a shorter list."""
    with np.errstate(over="ignore", invalid="ignore"):
        scores = model.embeddings @ vector.astype(np.float32) + model.bias
    candidates = np.ones(len(scores), dtype=bool)
    candidates[rated.items] = False
    candidates[np.asarray(exclude, dtype=np.int64)] = False
    bad = int(np.count_nonzero(~np.isfinite(scores[candidates])))
    if bad:
        raise ValueError(f"{bad} of {int(candidates.sum())} item scores are NaN or Inf: the model or the user "
                         "vector is damaged")
    scores[~candidates] = -np.inf
    k = min(k, int(np.isfinite(scores).sum()))
    top = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, dtype=np.int64)
    top = top[np.argsort(-scores[top], kind="stable")]
    liked = rated.items[rated.ratings >= rated.ratings.mean()]

    def unit(rows: np.ndarray) -> np.ndarray:
        e = model.embeddings[rows].astype(np.float64)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    cosine = unit(top) @ unit(liked).T
    best = np.argmax(cosine, axis=1)
    return [Recommendation(int(i), float(scores[i]), int(liked[b]), float(cosine[r, b]))
            for r, (i, b) in enumerate(zip(top, best))]


def load_model_files(model_path: str, items_path: str) -> GlobalModel:
    """A run's ``model.safetensors`` and its items file; ``config.json`` beside the model, when
    there, gives the run's ``model.loss`` and ``model.user-reg``."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UsageError(f"{path}: no such model file (a fedrec run's model.safetensors)")
    try:
        arrays = load_arrays(path)
    except Exception as exc:  # safetensors raises its own types for a file that is not one
        raise UsageError(f"{path}: not a safetensors model ({exc})") from None
    missing = [k for k in ITEM_PARAM_NAMES if k not in arrays]
    if missing:
        raise UsageError(f"{path}: expected arrays {', '.join(ITEM_PARAM_NAMES)} (a fedrec run's model.safetensors), "
                         f"found {', '.join(sorted(arrays)) or 'none'}")
    emb, bias = arrays[ITEM_PARAM_NAMES[0]], arrays[ITEM_PARAM_NAMES[1]]
    ids, titles = read_items_file(items_path)
    if emb.ndim != 2 or bias.shape != (emb.shape[0],) or len(ids) != emb.shape[0]:
        raise UsageError(f"{items_path} lists {len(ids)} items but {path.name} has embeddings {emb.shape} and biases "
                         f"{bias.shape}: use the items file published with this model")
    if emb.dtype.kind != "f" or bias.dtype.kind != "f":
        raise UsageError(f"{path}: expected float arrays, found {emb.dtype} and {bias.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        emb, bias = emb.astype(np.float32), bias.astype(np.float32)
    problem = non_finite(emb, ITEM_PARAM_NAMES[0]) or non_finite(bias, ITEM_PARAM_NAMES[1])
    if problem:
        raise UsageError(f"{path}: a damaged model ({problem}, or beyond float32): nothing to recommend from")
    loss, user_reg = run_config(path.parent / "config.json")
    return GlobalModel(tuple(ids), tuple(titles), emb, bias, None, loss, user_reg)


def run_config(config: Path) -> tuple[str | None, float | None]:
    """``model.loss`` and ``model.user-reg`` from a run's ``config.json`` (None, None without one)."""
    if not config.is_file():
        return None, None
    try:
        flat = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{config}: not a fedrec run config ({exc}); fix or remove it") from None
    if not isinstance(flat, dict):
        raise UsageError(f"{config}: expected a JSON object of config keys, found {type(flat).__name__}")
    loss, user_reg = flat.get("model.loss"), flat.get("model.user-reg")
    if loss is not None and not (isinstance(loss, str) and loss):
        raise UsageError(f"{config}: model.loss must be a loss name, found {loss!r}")
    if user_reg is not None:
        if isinstance(user_reg, bool) or not isinstance(user_reg, (int, float)) or not (
                np.isfinite(user_reg) and user_reg > 0):
            raise UsageError(f"{config}: model.user-reg must be a finite number > 0, found {user_reg!r}")
        user_reg = float(user_reg)
    return loss, user_reg


def user_vector(store, model: GlobalModel, rated: MappedRatings) -> tuple[np.ndarray, float | None]:
    """The user's vector for ``model``: the stored one when it was fitted to this model and these
    ratings, else fitted now and stored. Returns (vector, seconds spent importing torch, None when
    the cached vector fit)."""
    import time

    key = user_vector_fingerprint(model.embeddings, model.bias, rated.items, rated.ratings, model.loss, model.user_reg)
    vector = store.get_user_vector(key)
    if vector is not None:
        return vector, None
    start = time.perf_counter()
    import common.models.reconstruction  # noqa: F401 - torch, imported only when no cached vector fits; timed apart
    t_import = time.perf_counter() - start
    vector = fit_user_vector(model, rated)
    if non_finite(vector, "user vector"):
        raise UsageError("your user vector could not be fitted to this model (NaN/Inf): the model is "
                         "damaged or unusable")
    store.set_user_vector(vector, fingerprint=key)
    return vector, t_import


def fit_user_vector(model: GlobalModel, rated: MappedRatings) -> np.ndarray:
    """Reconstruct the user's vector against the model, as the federated evaluation does."""
    import torch

    from common.config import ModelConfig
    from common.models import ItemParams, UserData
    from common.models.reconstruction import fit_user, sample_negatives
    from common.streams import Stream, generator

    torch.set_num_threads(1)  # a d×d Newton solve: more threads only contend (as in the ClientApp)
    defaults = ModelConfig()
    loss = model.loss or defaults.loss
    reg = defaults.user_reg if model.user_reg is None else model.user_reg
    try:
        ModelConfig(loss=loss, user_reg=reg)  # an unknown loss from a run's config.json: one line, not a traceback
    except ValueError as exc:
        raise UsageError(f"the model's run config: {exc}") from None
    params = ItemParams(model.embeddings, model.bias)
    negatives = None
    if loss == "bpr":  # the same draw as common.device.reconstruct_users
        negatives = sample_negatives(rated.items, params.n_items, len(rated.items), generator(Stream.RECONSTRUCT, 0))
    return fit_user(params, UserData(rated.items, rated.ratings), loss=loss, reg=reg, negatives=negatives)
