"""What the device store keeps as bytes in its ``state`` table, and the checks on the way in and
out: the global model and the user vector as safetensors (never pickle), with their metadata.
A value that does not parse, has NaN/Inf or shapes that disagree is a ``ValueError`` naming it
(client/store.py turns it into a ``StoreError``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from common.keys import ITEM_PARAM_NAMES


@dataclass(frozen=True)
class GlobalModel:
    """A global model and the item ids (and titles) its rows stand for."""

    item_ids: tuple[str, ...]
    titles: tuple[str, ...]
    embeddings: np.ndarray  # (I, d) float32
    bias: np.ndarray  # (I,) float32
    round: int | None  # the rounds completed when it was sent; None for a model read from a file
    loss: str | None = None  # the run's model.loss / model.user-reg (None: the defaults)
    user_reg: float | None = None
    run: int | None = None  # the Flower run that sent it, when known (a new run's model replaces it)

    def index(self) -> dict[str, int]:
        return {item: i for i, item in enumerate(self.item_ids)}


def non_finite(array: np.ndarray, name: str) -> str | None:
    """"NAME: k of n values are NaN or Inf" when ``array`` has any, else None."""
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    return f"{name}: {bad} of {np.size(array)} values are NaN or Inf" if bad else None


def user_vector_fingerprint(embeddings: np.ndarray, bias: np.ndarray, items: np.ndarray, ratings: np.ndarray,
                            loss: str | None, user_reg: float | None) -> str:
    """What a reconstructed user vector depends on: a cached vector is valid while this matches."""
    h = hashlib.sha256()
    for array, dtype in ((embeddings, np.float32), (bias, np.float32), (items, np.int64), (ratings, np.float32)):
        h.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    h.update(f"|{loss or 'default'}|{'default' if user_reg is None else repr(float(user_reg))}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- the global model
def encode_global_model(n_items: int, embeddings: np.ndarray, bias: np.ndarray, round: int, *,
                        loss: str | None = None, user_reg: float | None = None, run: int | None = None) -> bytes:
    """The model's bytes; a model with NaN/Inf (also after the cast to float32), shapes that
    disagree with ``n_items``, a negative round or a bad ``user_reg`` is refused."""
    with np.errstate(over="ignore", invalid="ignore"):
        emb, b = np.asarray(embeddings, dtype=np.float32), np.asarray(bias, dtype=np.float32)
    if emb.ndim != 2 or b.shape != (emb.shape[0],) or n_items != emb.shape[0]:
        raise ValueError(f"global model: embeddings {emb.shape}, bias {b.shape} and {n_items} item ids "
                         "must agree on the number of items")
    problem = non_finite(emb, "embeddings") or non_finite(b, "biases")
    if problem:
        raise ValueError(f"global model refused: {problem}")
    if int(round) < 0:
        raise ValueError(f"global model round must be ≥ 0, got {round}")
    if user_reg is not None and not (np.isfinite(user_reg) and user_reg > 0):
        raise ValueError(f"global model: user-reg must be a finite number > 0, got {user_reg}")
    meta = {"format": "fedrec-mf-items", "round": str(int(round)), "loss": loss or "",
            "user-reg": "" if user_reg is None else repr(float(user_reg)),
            "run": "" if run is None else str(int(run))}
    return save_safetensors({ITEM_PARAM_NAMES[0]: np.ascontiguousarray(emb),
                             ITEM_PARAM_NAMES[1]: np.ascontiguousarray(b)}, metadata=meta)


def decode_global_model(blob: bytes) -> tuple[np.ndarray, np.ndarray, int, str | None, float | None, int | None]:
    """(embeddings, biases, round, loss, user_reg, run) of :func:`encode_global_model`'s bytes;
    anything damaged raises (``ValueError``, ``KeyError`` or safetensors' own error)."""
    arrays, meta = load_safetensors(blob), _metadata(blob)
    emb, bias = arrays[ITEM_PARAM_NAMES[0]], arrays[ITEM_PARAM_NAMES[1]]
    model_round = int(meta["round"])
    user_reg = float(meta["user-reg"]) if meta.get("user-reg") else None
    run = int(meta["run"]) if meta.get("run") else None
    if emb.ndim != 2 or emb.dtype.kind != "f" or bias.shape != (emb.shape[0],) or bias.dtype.kind != "f":
        raise ValueError(f"embeddings {emb.shape} {emb.dtype} and biases {bias.shape} {bias.dtype} do not agree")
    if model_round < 0 or (user_reg is not None and not (np.isfinite(user_reg) and user_reg > 0)):
        raise ValueError(f"round {model_round}, user-reg {user_reg}")
    problem = non_finite(emb, "embeddings") or non_finite(bias, "biases")
    if problem:
        raise ValueError(problem)
    return emb, bias, model_round, meta.get("loss") or None, user_reg, run


# ---------------------------------------------------------------- the user vector
def encode_user_vector(vector: np.ndarray, fingerprint: str) -> bytes:
    """The vector's bytes (as given) and what it was fitted to; a non-1-D, non-float or
    non-finite vector is refused."""
    vector = np.asarray(vector)
    if vector.ndim != 1 or vector.dtype.kind != "f":
        raise ValueError(f"a user vector is a 1-D float array, got shape {vector.shape} of {vector.dtype}")
    problem = non_finite(vector, "user vector")
    if problem:
        raise ValueError(f"user vector refused: {problem}")
    return save_safetensors({"user_vector": np.ascontiguousarray(vector)}, metadata={"fingerprint": fingerprint})


def decode_user_vector(blob: bytes) -> tuple[np.ndarray, str | None]:
    """(vector, fingerprint) of :func:`encode_user_vector`'s bytes (raises when damaged)."""
    stored = _metadata(blob).get("fingerprint")
    return load_safetensors(blob)["user_vector"], stored


def _metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (8-byte little-endian header size, JSON header)."""
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + size]).get("__metadata__") or {}
