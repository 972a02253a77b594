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
    TextItemEncoder,
    encode_base,
    item_vectors,
    load_trainable_state,
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


def index_tokens(n_items: int) -> dict[str, torch.Tensor]:
    """Pseudo-tokens for :class:`PrecomputedBaseEncoder`: row i holds the item index i."""
    return {"input_ids": torch.arange(n_items, dtype=torch.long)[:, None],
            "attention_mask": torch.ones((n_items, 1), dtype=torch.long)}


def base_embeddings(texts: Sequence[str], max_length: int) -> np.ndarray:
    """Frozen MiniLM sentence embeddings of ``texts`` (N, 384), cached on disk under
    ``$FEDREC_CACHE/text/`` (keyed by the texts and ``max_length``) and per process."""
    return _base_embeddings(tuple(texts), int(max_length))


@functools.lru_cache(maxsize=4)
def _base_embeddings(texts: tuple[str, ...], max_length: int) -> np.ndarray:
    from common.data.embedded import cache_dir

    digest = hashlib.sha256(("all-MiniLM-L6-v2\x00" + str(max_length) + "\x00" + "\x00".join(texts)).encode()).hexdigest()
    path = cache_dir() / "text" / f"minilm-{digest[:24]}.npy"
    if path.is_file():
        try:
            out = np.load(path)
            if out.shape == (len(texts), BASE_DIM):
                return out
        except (OSError, ValueError):
            pass
    out = encode_base(list(texts), max_length=max_length)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.part.npy")
        np.save(tmp, out)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
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

    def __init__(self, texts: Sequence[str], *, dim: int, lora: bool, max_length: int, seed: int) -> None:
        self.texts = tuple(texts)
        self.dim, self.lora, self.max_length = dim, lora, max_length
        if lora:
            self.encoder: TextItemEncoder = TextItemEncoder(dim, lora=True, seed=seed)
            self.tokens = tokenize(self.texts, max_length=max_length)
        else:
            self.encoder = PrecomputedBaseEncoder(base_embeddings(self.texts, max_length), dim, seed=seed)
            self.tokens = index_tokens(len(self.texts))
        self.encoder.eval()
        self._initial = trainable_state(self.encoder)

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
        """The item text vectors (I, d) for this adapter state, float32."""
        load_trainable_state(self.encoder, adapter)
        if isinstance(self.encoder, PrecomputedBaseEncoder):
            return self.encoder.all_vectors()
        return item_vectors(self.encoder, self.texts, max_length=self.max_length)


@functools.lru_cache(maxsize=2)
def _cached_side(texts: tuple[str, ...], dim: int, lora: bool, max_length: int, seed: int) -> TextSide:
    return TextSide(texts, dim=dim, lora=lora, max_length=max_length, seed=seed)


def text_side(texts: Sequence[str], model: ModelConfig, seed: int) -> TextSide:
    """The process-wide :class:`TextSide` for these texts and settings (built once)."""
    return _cached_side(tuple(texts), model.dim, model.lora, model.text_max_length, seed)
