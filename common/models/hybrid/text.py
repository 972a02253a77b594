"""The text side of one process: the item texts, the encoder (MiniLM + head, optionally LoRA) and
its inputs for every item; with a frozen base, sentence embeddings computed once and cached."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from common.config import ModelConfig
from common.models.hybrid.encoder import (
    BASE_DIM,
    N_LAYERS,
    TextItemEncoder,
    _attention_mask_4d,
    bert_of,
    encode_base,
    item_vectors,
    load_trainable_state,
    lower_hidden,
    mean_pool,
    run_layers,
    tokenize,
    trainable_state,
)
from common.models.hybrid.params import adapter_order

log = logging.getLogger(__name__)


class PrecomputedBaseEncoder(TextItemEncoder):
    """The frozen encoder + head with the base's sentence embeddings looked up, not computed.

    Behaves as ``TextItemEncoder(dim, lora=False, seed=seed)`` (same head initialisation, same
    ``trainable_state`` keys) for inputs from :func:`index_tokens`, whose ``input_ids[:, 0]``
    are item indices into ``base_embeddings`` (N, 384). No transformer runs.
    """

    def __init__(self, base_embeddings: np.ndarray, dim: int, *, seed: int = 0) -> None:
        nn.Module.__init__(self)
        if dim < 1:
            raise ValueError(f"dim must be ≥ 1, got {dim}")
        table = torch.as_tensor(np.asarray(base_embeddings, dtype=np.float32))
        if table.ndim != 2 or table.shape[1] != BASE_DIM:
            raise ValueError(f"base embeddings must be (N, {BASE_DIM}), got {tuple(table.shape)}")
        self.dim, self.lora = dim, False
        self.register_buffer("table", table, persistent=False)
        with torch.random.fork_rng(devices=[]):  # exactly TextItemEncoder's head initialisation
            torch.manual_seed(seed)
            self.head = nn.Linear(BASE_DIM, dim)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids[:, 0]]

    @torch.no_grad()
    def all_vectors(self) -> np.ndarray:
        """head(base embedding) of every item (N, dim), float32."""
        return self.head(self.table).numpy().astype(np.float32)


class CachedLowerEncoder(TextItemEncoder):
    """MiniLM with LoRA on its top ``lora_layers`` layers, whose frozen lower layers have run once
    for the whole catalogue: a step runs (and back-propagates through) the adapted layers only,
    on hidden states trimmed to the batch's longest text.

    Behaves as ``TextItemEncoder(dim, lora=True, lora_layers=lora_layers, seed=seed)`` (same
    weights, same ``trainable_state`` keys; equal outputs to float rounding) for inputs from
    :func:`index_tokens`. The cache is ~N·T·384 floats (1,682 ML-100K items: ~80 MB): a server or
    a simulation's worker holds it; a device that only recommends does not need LoRA at all.
    """

    def __init__(self, texts: Sequence[str], dim: int, *, lora_layers: int, max_length: int, seed: int = 0) -> None:
        if not 1 <= lora_layers < N_LAYERS:
            raise ValueError(f"a cached lower part needs 1 ≤ lora_layers < {N_LAYERS}, got {lora_layers}")
        super().__init__(dim, lora=True, seed=seed, lora_layers=lora_layers)
        self.start = N_LAYERS - lora_layers
        lower, mask = lower_hidden(texts, self.start, max_length=max_length)
        self.register_buffer("lower", lower, persistent=False)
        self.register_buffer("mask", mask, persistent=False)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        idx = input_ids[:, 0]
        mask = self.mask[idx]
        longest = int(mask.sum(1).max())
        mask = mask[:, :longest]
        hidden = run_layers(self.base, self.lower[idx, :longest], mask, self.start)
        return mean_pool(hidden, mask)

    def all_vectors(self) -> np.ndarray:
        """The adapted encoder's vectors of every item (N, dim), float32, in length-sorted batches."""
        return _indexed_vectors(self, np.argsort(self.mask.sum(1).numpy(), kind="stable"), 128)


class CachedFfnOutEncoder(TextItemEncoder):
    """MiniLM with LoRA on the top layer's feed-forward output projection only (``lora_target =
    "ffn-out"``, one layer): everything below that matrix is frozen, so for every token of the
    catalogue its input x (1536-d, after the GELU) and the frozen part of the layer's output
    z = dense(x) + attention output (384-d, before the LayerNorm) are computed once. A step is then
    LayerNorm(z + s·B·A·x) over the batch's tokens, mean-pooled, and the head: no attention, no
    feed-forward pass, and gradients flow through A, B and the head only.

    Behaves as ``TextItemEncoder(dim, lora=True, lora_layers=1, lora_target="ffn-out", seed=seed)``
    (same weights and ``trainable_state`` keys; equal outputs to float rounding) for inputs from
    :func:`index_tokens`. The cache holds (1536 + 384) floats per token (ML-100K's 1,682 texts:
    24,847 tokens, ~190 MB), kept by a server or a simulation's worker.
    """

    def __init__(self, texts: Sequence[str], dim: int, *, max_length: int, seed: int = 0) -> None:
        super().__init__(dim, lora=True, seed=seed, lora_layers=1, lora_target="ffn-out")
        lower, mask = lower_hidden(texts, N_LAYERS - 1, max_length=max_length)
        layer = bert_of(self.base).encoder.layer[N_LAYERS - 1]
        lengths = mask.sum(1)
        xs, zs = [], []
        with torch.no_grad():
            for s in range(0, len(texts), 64):
                hidden, m = lower[s:s + 64], mask[s:s + 64]
                longest = int(m.sum(1).max())
                hidden, m = hidden[:, :longest], m[:, :longest]
                attention = layer.attention(hidden, _attention_mask_4d(bert_of(self.base), hidden, m))
                attention = attention[0] if isinstance(attention, tuple) else attention
                x = layer.intermediate(attention)
                z = layer.output.dense.base_layer(x) + attention
                keep = m.bool()
                xs.append(x[keep])
                zs.append(z[keep])
        self.register_buffer("x", torch.cat(xs), persistent=False)  # (tokens, 1536), item by item
        self.register_buffer("z", torch.cat(zs), persistent=False)  # (tokens, 384)
        offsets = torch.zeros(len(texts) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        self.register_buffer("offsets", offsets, persistent=False)
        self._dense, self._norm = layer.output.dense, layer.output.LayerNorm

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        idx = input_ids[:, 0]
        starts, stops = self.offsets[idx], self.offsets[idx + 1]
        counts = stops - starts
        segment = torch.repeat_interleave(torch.arange(len(idx)), counts)
        rows = starts[segment] + (torch.arange(int(counts.sum())) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts))
        dense = self._dense
        delta = dense.lora_B["default"](dense.lora_A["default"](self.x[rows])) * dense.scaling["default"]
        hidden = self._norm(self.z[rows] + delta)
        pooled = torch.zeros((len(idx), BASE_DIM), dtype=hidden.dtype).index_add_(0, segment, hidden)
        pooled = pooled / counts.clamp(min=1).unsqueeze(1).to(hidden.dtype)
        return nn.functional.normalize(pooled, p=2, dim=-1)

    def all_vectors(self) -> np.ndarray:
        """The adapted encoder's vectors of every item (N, dim), float32."""
        return _indexed_vectors(self, np.arange(len(self.offsets) - 1), 512)


@torch.no_grad()
def _indexed_vectors(encoder: TextItemEncoder, order: np.ndarray, batch_size: int) -> np.ndarray:
    """The vectors (N, dim) of every item of an encoder fed :func:`index_tokens`, in eval mode,
    batch by batch in ``order`` (a permutation of the items), scattered back to item order."""
    was_training = encoder.training
    encoder.eval()
    try:
        out = np.zeros((len(order), encoder.dim), dtype=np.float32)
        tokens = index_tokens(len(order))
        for s in range(0, len(order), batch_size):
            idx = torch.from_numpy(np.asarray(order[s:s + batch_size]))
            out[idx.numpy()] = encoder(tokens["input_ids"][idx], tokens["attention_mask"][idx]).numpy()
        return out
    finally:
        encoder.train(was_training)


def index_tokens(n_items: int) -> dict[str, torch.Tensor]:
    """Pseudo-tokens for :class:`PrecomputedBaseEncoder`: row i holds the item index i."""
    return {"input_ids": torch.arange(n_items, dtype=torch.long)[:, None],
            "attention_mask": torch.ones((n_items, 1), dtype=torch.long)}


def base_embeddings(texts: Sequence[str], max_length: int) -> np.ndarray:
    """Frozen MiniLM sentence embeddings of ``texts`` (N, 384), cached on disk under
    ``$FEDREC_CACHE/text/`` (keyed by the texts and ``max_length``) and per process."""
    return _base_embeddings(tuple(texts), int(max_length))


#: The encoder whose sentence embeddings a catalogue file carries.
ENCODER_NAME = "all-MiniLM-L6-v2"
#: ``items.csv`` → ``items.embeddings.safetensors``: the catalogue's embeddings, published beside it.
EMBEDDINGS_SUFFIX = ".embeddings.safetensors"


def texts_digest(texts: Sequence[str], max_length: int) -> str:
    """SHA-256 naming the encoder, the truncation and every text: the key of the embedding cache
    and what a published embeddings file must carry to be accepted for these texts."""
    return hashlib.sha256((ENCODER_NAME + "\x00" + str(max_length) + "\x00" + "\x00".join(texts)).encode()).hexdigest()


def _cache_path(texts: Sequence[str], max_length: int):
    from common.data.embedded import cache_dir

    return cache_dir() / "text" / f"minilm-{texts_digest(texts, max_length)[:24]}.npy"


def embeddings_cached(texts: Sequence[str], max_length: int) -> bool:
    """Whether :func:`base_embeddings` of these texts is on disk already (no MiniLM pass needed)."""
    return _cache_path(texts, max_length).is_file()


def _write_cache(path, out: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.part.npy")
    np.save(tmp, out)
    os.replace(tmp, path)  # atomic: concurrent processes never read half a file


def embeddings_file_for(items_file) -> "os.PathLike":
    """Where a catalogue's embeddings are published: beside its items file."""
    from pathlib import Path

    path = Path(items_file)
    return path.with_name(path.stem + EMBEDDINGS_SUFFIX)


def publish_embeddings(path, texts: Sequence[str], max_length: int) -> np.ndarray:
    """Write the catalogue's sentence embeddings (public: computed from public texts) to ``path``
    with the encoder, the truncation and the texts' digest, so that a device can use them instead
    of running MiniLM over the catalogue itself."""
    from common.serialization import save_arrays

    out = base_embeddings(texts, max_length)
    save_arrays(path, {"embeddings": out}, metadata={"encoder": ENCODER_NAME, "max_length": str(int(max_length)),
                                                     "texts_sha256": texts_digest(texts, max_length)})
    return out


def import_embeddings(path, texts: Sequence[str], max_length: int) -> np.ndarray:
    """Check a published embeddings file against these texts and put it in this machine's cache
    (where :func:`base_embeddings` reads): ValueError naming the file for another encoder, other
    texts or truncation, a wrong shape, or values that are not unit-norm finite embeddings."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            out = np.asarray(f.get_tensor("embeddings")) if names == ["embeddings"] else None
    except Exception as exc:  # OSError, or safetensors' own error types for a file that is not one
        raise ValueError(f"{path}: not a catalogue embeddings file ({exc})") from None
    if out is None:
        raise ValueError(f"{path}: expected one array 'embeddings', found {names}")
    if meta.get("encoder") != ENCODER_NAME or meta.get("max_length") != str(int(max_length)):
        raise ValueError(f"{path}: embeddings of {meta.get('encoder')!r} at {meta.get('max_length')} tokens, this device "
                         f"uses {ENCODER_NAME!r} at {max_length}")
    if meta.get("texts_sha256") != texts_digest(texts, max_length):
        raise ValueError(f"{path}: embeddings of other item texts than this items file's (publish both from the same "
                         "run: fedrec deploy items --embed)")
    if out.shape != (len(texts), BASE_DIM) or out.dtype != np.float32:
        raise ValueError(f"{path}: expected float32 embeddings of shape ({len(texts)}, {BASE_DIM}), found {out.dtype} "
                         f"{out.shape}")
    norms = np.linalg.norm(out, axis=1) if out.size else np.ones(0)
    if not np.all(np.isfinite(out)) or not np.all(np.abs(norms - 1.0) < 1e-3):
        raise ValueError(f"{path}: not unit-norm finite sentence embeddings")
    _write_cache(_cache_path(texts, max_length), out)
    _base_embeddings.cache_clear()
    return out


@functools.lru_cache(maxsize=4)
def _base_embeddings(texts: tuple[str, ...], max_length: int) -> np.ndarray:
    path = _cache_path(texts, max_length)
    if path.is_file():
        try:
            out = np.load(path)
            if out.shape == (len(texts), BASE_DIM):
                return out
        except (OSError, ValueError):
            pass
    out = encode_base(list(texts), max_length=max_length)
    try:
        _write_cache(path, out)
    except OSError as exc:
        log.warning("could not cache item text embeddings in %s: %s", path, exc)
    return out


class TextSide:
    """One process's text side: the item texts, an encoder and its inputs for all items.

    ``lora=False``: a :class:`PrecomputedBaseEncoder` over the cached base embeddings (cheap).
    ``lora=True``: MiniLM with a LoRA adapter and the tokenised texts (the client's and the
    server's expensive case). The encoder is shared: :meth:`vectors` and
    :func:`hybrid_client_train` load the adapter state they are given before using it.
    """

    def __init__(self, texts: Sequence[str], *, dim: int, lora: bool, max_length: int, seed: int,
                 lora_layers: int = N_LAYERS, lora_target: str = "qv") -> None:
        self.texts = tuple(texts)
        self.dim, self.lora, self.max_length = dim, lora, max_length
        if lora and lora_target == "ffn-out":
            if lora_layers != 1:
                raise ValueError(f"model.lora-target = ffn-out adapts the top layer only: set model.lora-layers = 1, "
                                 f"not {lora_layers}")
            self.encoder = CachedFfnOutEncoder(self.texts, dim, max_length=max_length, seed=seed)
            self.tokens = index_tokens(len(self.texts))
        elif lora and lora_layers < N_LAYERS:
            self.encoder: TextItemEncoder = CachedLowerEncoder(self.texts, dim, lora_layers=lora_layers,
                                                               max_length=max_length, seed=seed)
            self.tokens = index_tokens(len(self.texts))
        elif lora:
            self.encoder = TextItemEncoder(dim, lora=True, seed=seed)
            self.tokens = tokenize(self.texts, max_length=max_length)
        else:
            self.encoder = PrecomputedBaseEncoder(base_embeddings(self.texts, max_length), dim, seed=seed)
            self.tokens = index_tokens(len(self.texts))
        self.encoder.eval()
        self._initial = trainable_state(self.encoder)
        self._last: tuple[str, np.ndarray] | None = None

    @property
    def n_items(self) -> int:
        return len(self.texts)

    @property
    def adapter_names(self) -> list[str]:
        return adapter_order(self._initial)

    def initial_adapter(self) -> dict[str, np.ndarray]:
        """The adapter's initial state (head init by the seed; LoRA B = 0, so the adapted
        encoder starts equal to the base)."""
        return {k: v.copy() for k, v in self._initial.items()}

    def vectors(self, adapter: dict[str, np.ndarray]) -> np.ndarray:
        """The item text vectors (I, d) for this adapter state, float32 (a copy). The last state's
        vectors are kept: the clients a process serves in one round share the round's adapter,
        and with LoRA the catalogue pass is the round's largest cost."""
        digest = _digest(adapter)
        if self._last is not None and self._last[0] == digest:
            return self._last[1].copy()
        load_trainable_state(self.encoder, adapter)
        if isinstance(self.encoder, (PrecomputedBaseEncoder, CachedLowerEncoder, CachedFfnOutEncoder)):
            out = self.encoder.all_vectors()
        else:
            out = item_vectors(self.encoder, self.texts, max_length=self.max_length)
        self._last = (digest, out.copy())
        return out


def _digest(adapter: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(adapter):
        value = np.ascontiguousarray(adapter[key], dtype=np.float32)
        h.update(key.encode() + b"\x00" + str(value.shape).encode() + b"\x00" + value.tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=2)
def _cached_side(texts: tuple[str, ...], dim: int, lora: bool, max_length: int, seed: int, lora_layers: int,
                 lora_target: str) -> TextSide:
    return TextSide(texts, dim=dim, lora=lora, max_length=max_length, seed=seed, lora_layers=lora_layers,
                    lora_target=lora_target)


def text_side(texts: Sequence[str], model: ModelConfig, seed: int) -> TextSide:
    """The process-wide :class:`TextSide` for these texts and settings (built once)."""
    return _cached_side(tuple(texts), model.dim, model.lora, model.text_max_length, seed, model.lora_layers,
                        model.lora_target)
