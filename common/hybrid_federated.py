"""The hybrid recommender, federated: MF item vectors plus a language-model text part.

``model.kind = "hybrid"``: the vector of item i is ``free_i + text_i`` with
``text_i = head(encoder(text of item i))``, where the encoder is the frozen MiniLM base (with
LoRA adapters when ``model.lora``) and ``head`` a ``Linear(384, dim)``. Users are reconstructed
on the device exactly as in MF (:func:`common.mf.fit_user` on the effective item vectors).

What travels, server → client, every round (in this order):

==========================  ===========  ============================================================
``item_embeddings`` (I, d)  trainable    the free part of the item vectors
``item_bias`` (I,)          trainable
``head.weight`` (d, 384)    trainable    projection of the sentence embedding into the item space
``head.bias`` (d,)          trainable
``lora.*`` (sorted)         trainable    only with ``model.lora``: the LoRA A/B matrices
``item_text_vectors``       context      (I, d) = head(encoder(texts)) for the released adapter,
                                         computed by the server after each release (item texts are
                                         public); NOT trainable: no update is sent for it
==========================  ===========  ============================================================

The instruction's config says how many leading arrays are trainable (``keys.TRAINABLE_ARRAYS``)
and names the trailing context array (``keys.CONTEXT_ARRAYS``). The frozen base model never
travels. Client → server: the update of the trainable arrays only, clipped per group (the
biases keep their share ``dp.bias-share`` of C², embeddings and adapter share the rest),
then secure-aggregated, noised and released exactly like the MF arrays, and recorded in the
privacy ledger under these names.

A client's round: reconstruct its user vector(s) with the effective vectors ``free + text``,
take the MF step on free/bias (:func:`common.federated.client_train`, unchanged, with
embeddings = free + text, so the update of the effective embeddings is the update of the free
part), then :func:`common.hybrid.adapter_update` on its positives (at most ``model.text-positives``,
sampled) + ``model.text-negatives`` sampled negatives for the head (+ LoRA) update. That is one
SGD step, so ``model.text-lr`` only sets the adapter's weight against the free part inside the
clipped update (the server's FedAdam normalises each coordinate). With a frozen encoder the sentence embeddings of the items are
deterministic, so they are computed once per process (and cached on disk) and the head step
runs on them (:class:`PrecomputedBaseEncoder`): no transformer pass per round.

Items nobody interacted with still have a text vector, so they can be ranked from their text;
``common.hybrid.hybrid_item_params(..., cold_items=...)`` drops their (never trained) free part
for items the catalogue marks as new.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common import keys
from common.config import DataConfig, DPConfig, ModelConfig, RunConfig
from common.federated import ClientData, ServerOptimizer, client_evaluate, client_train, server_update_arrays
from common.hybrid import adapter_update
from common.mf import ItemParams, UserData
from common.privacy.dp_fedavg import GaussianNoise, clip_update
from common.text_encoder import (BASE_DIM, HEAD_KEYS, TextItemEncoder, encode_base, item_vectors,
                                 load_trainable_state, tokenize, trainable_state)

log = logging.getLogger(__name__)

ADAPTER_HEAD = ("head.weight", "head.bias")  # travel order of the head (then the LoRA arrays, sorted)
assert set(ADAPTER_HEAD) == set(HEAD_KEYS)


def adapter_order(names: Sequence[str]) -> list[str]:
    """The travel order of adapter arrays: head weight, head bias, then the LoRA arrays sorted."""
    extra = sorted(n for n in names if n not in ADAPTER_HEAD)
    return [*ADAPTER_HEAD, *extra]


@dataclass
class HybridParams:
    """The hybrid model's global trainable parameters: the free item part (an MF
    :class:`ItemParams`) and the text side's adapter (head + LoRA, ``trainable_state`` keys)."""

    free: ItemParams
    adapter: dict[str, np.ndarray]

    @property
    def n_items(self) -> int:
        return self.free.n_items

    @property
    def dim(self) -> int:
        return self.free.dim

    @property
    def adapter_names(self) -> list[str]:
        return adapter_order(self.adapter)

    def names(self) -> tuple[str, ...]:
        """Names of the trainable arrays in travel order (what the privacy ledger records)."""
        return (*keys.ITEM_PARAM_NAMES, *self.adapter_names)

    def to_arrays(self) -> list[np.ndarray]:
        return [self.free.embeddings, self.free.bias, *(self.adapter[k] for k in self.adapter_names)]

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], adapter_names: Sequence[str]) -> "HybridParams":
        names = adapter_order(adapter_names)
        if len(arrays) != 2 + len(names):
            raise ValueError(f"{len(arrays)} arrays, expected {2 + len(names)} (free embeddings, biases, {len(names)} adapter)")
        return cls(ItemParams.from_arrays(list(arrays[:2])),
                   {k: np.asarray(a, dtype=np.float32) for k, a in zip(names, arrays[2:])})

    def with_arrays(self, arrays: Sequence[np.ndarray]) -> "HybridParams":
        return HybridParams.from_arrays(arrays, self.adapter_names)

    def named_arrays(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names(), self.to_arrays()))

    @classmethod
    def from_named(cls, named: dict[str, np.ndarray]) -> "HybridParams":
        free = ItemParams(np.asarray(named[keys.ITEM_PARAM_NAMES[0]], np.float32),
                          np.asarray(named[keys.ITEM_PARAM_NAMES[1]], np.float32))
        adapter = {k: np.asarray(v, np.float32) for k, v in named.items() if k not in keys.ITEM_PARAM_NAMES}
        return cls(free, adapter)

    def copy(self) -> "HybridParams":
        return HybridParams(self.free.copy(), {k: v.copy() for k, v in self.adapter.items()})

    def effective(self, text_vectors: np.ndarray) -> ItemParams:
        """The MF view: embeddings ``free + text``, biases ``free``."""
        return ItemParams((self.free.embeddings + np.asarray(text_vectors, np.float32)).astype(np.float32),
                          self.free.bias)


def is_hybrid(params: object) -> bool:
    return isinstance(params, HybridParams)


# ---------------------------------------------------------------- the text side of one process

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


@functools.lru_cache(maxsize=2)
def item_texts(data: DataConfig) -> tuple[str, ...]:
    """The public text of every item (``ItemInfo.text``), in model-row order."""
    from common.data import load_interactions

    interactions = load_interactions(data.source, data.format, data.item_file or None)
    return tuple(info.text for info in interactions.items)


def init_hybrid(free: ItemParams, side: TextSide) -> HybridParams:
    """The initial global hybrid model: MF's initial free part and the adapter's initial state."""
    if free.n_items != side.n_items:
        raise ValueError(f"{free.n_items} items in the model but {side.n_items} item texts")
    if free.dim != side.dim:
        raise ValueError(f"model dim {free.dim} but text side dim {side.dim}")
    return HybridParams(free, side.initial_adapter())


def add_lora(params: HybridParams, side: TextSide) -> HybridParams:
    """The same model with the (initial) LoRA arrays of a LoRA ``side`` added (B = 0, so the
    text vectors do not change) and the trained head kept: frozen training → LoRA rounds."""
    if not side.lora:
        raise ValueError("add_lora needs a LoRA text side")
    adapter = {**side.initial_adapter(), **{k: v.copy() for k, v in params.adapter.items() if k in ADAPTER_HEAD}}
    return HybridParams(params.free.copy(), adapter)


def extend_optimizer(optimizer: ServerOptimizer, old: HybridParams, new: HybridParams) -> None:
    """Give ``optimizer`` zero moments for the arrays ``new`` has beyond ``old`` (appended last)."""
    old_names, new_names = old.names(), new.names()
    if new_names[:len(old_names)] != old_names:
        raise ValueError("the new parameters must extend the old ones at the end")
    if optimizer.m:
        for a in new.to_arrays()[len(old_names):]:
            optimizer.m.append(np.zeros(a.shape))
            optimizer.v.append(np.zeros(a.shape))


# ---------------------------------------------------------------- client

def split_arrays(parameters: Sequence[np.ndarray], n_trainable: int, adapter_names: Sequence[str]
                 ) -> tuple[HybridParams, np.ndarray]:
    """The received arrays as (trainable model, item text vectors)."""
    if len(parameters) != n_trainable + 1:
        raise ValueError(f"received {len(parameters)} arrays, expected {n_trainable} trainable + the item text vectors")
    params = HybridParams.from_arrays(parameters[:n_trainable], adapter_names)
    text = np.asarray(parameters[n_trainable], dtype=np.float32)
    if text.shape != params.free.embeddings.shape:
        raise ValueError(f"item text vectors {text.shape} do not match the item embeddings {params.free.embeddings.shape}")
    return params, text


def effective_from_arrays(parameters: Sequence[np.ndarray]) -> ItemParams:
    """The MF view of a hybrid instruction (trainable arrays + trailing text vectors): what
    evaluation needs (free embeddings + text vectors, biases); no encoder involved."""
    if len(parameters) < 5:
        raise ValueError(f"a hybrid model has at least 5 arrays (free, bias, head weight, head bias, text vectors), "
                         f"got {len(parameters)}")
    return HybridParams(ItemParams.from_arrays(list(parameters[:2])), {}).effective(parameters[-1])


def adapter_rng(seed: int, server_round: int, client_id: int) -> np.random.Generator:
    """The adapter step's negatives: a stream separate from the MF step's."""
    return np.random.default_rng([seed, server_round, client_id, 0x7E47])


def hybrid_client_train(params: HybridParams, text_vectors: np.ndarray, data: ClientData, side: TextSide, *,
                        model: ModelConfig, epochs: int, lr: float, seed: int, server_round: int
                        ) -> tuple[list[np.ndarray], float, list[np.ndarray], float]:
    """One client's hybrid round: (update of the trainable arrays in travel order, MF loss,
    user vectors to keep on the device, text-side loss). ``ValueError`` without interactions."""
    update, loss, vectors = client_train(params.effective(text_vectors), data, model=model, epochs=epochs, lr=lr,
                                         seed=seed, server_round=server_round)
    load_trainable_state(side.encoder, params.adapter)
    rng = adapter_rng(seed, server_round, data.client_id)
    text_losses = []
    for user, vector in zip(data.trainable, vectors):  # a silo chains its users' steps
        if len(user.items) > model.text_positives:  # bounds a heavy user's cost and memory
            keep = np.sort(rng.choice(len(user.items), size=model.text_positives, replace=False))
            user = UserData(user.items[keep], user.ratings[keep])
        _, text_loss = adapter_update(side.encoder, params.free, user, side.tokens, user_vector=vector,
                                      negatives_rng=rng, n_neg=model.text_negatives, lr=model.text_lr, epochs=epochs)
        text_losses.append(text_loss)
    new = trainable_state(side.encoder)
    delta = [new[k] - params.adapter[k] for k in params.adapter_names]
    return [update.embeddings, update.bias, *delta], loss, vectors, float(np.mean(text_losses))


def clip_hybrid_update(arrays: list[np.ndarray], clip: float, bias_share: float) -> list[np.ndarray]:
    """Clip ``[embeddings, biases, *adapter]`` to joint L2 norm ≤ ``clip``.

    ``bias_share`` ≤ 0: one flat clip. Otherwise per group, as for MF
    (:func:`common.privacy.dp_fedavg.clip_item_update`): the biases to ``clip·√share``, the
    embeddings and the adapter together to ``clip·√(1−share)``. With no adapter arrays this is
    exactly the MF clipping."""
    if bias_share <= 0:
        return clip_update(arrays, clip)[0]
    if not 0 < bias_share < 1:
        raise ValueError(f"bias_share must be in (0, 1), got {bias_share}")
    rest = clip_update([arrays[0], *arrays[2:]], clip * np.sqrt(1.0 - bias_share))[0]
    bias = clip_update([arrays[1]], clip * np.sqrt(bias_share))[0][0]
    return [rest[0], bias, *rest[1:]]


def hybrid_client_evaluate(params: HybridParams, text_vectors: np.ndarray, data: ClientData, *, model: ModelConfig,
                           phase: str, seed: int) -> dict[str, float]:
    """:func:`common.federated.client_evaluate` with the effective item vectors free + text."""
    return client_evaluate(params.effective(text_vectors), data, model=model, phase=phase, seed=seed)


def client_side(cfg: RunConfig) -> TextSide:
    """The text side a simulated client of this run uses (texts from the configured data)."""
    return text_side(item_texts(cfg.data), cfg.model, cfg.seed)


# ---------------------------------------------------------------- server

def hybrid_server_update(params: HybridParams, total: list[np.ndarray] | None, n: int, *,
                         optimizer: ServerOptimizer, dp: DPConfig | None, expected_cohort: float,
                         noise: GaussianNoise) -> HybridParams:
    """:func:`common.federated.server_update` for every trainable hybrid array (same noise
    std σC per coordinate, same fixed denominator, same optimizer)."""
    arrays = server_update_arrays(params.to_arrays(), total, n, optimizer=optimizer, dp=dp,
                                  expected_cohort=expected_cohort, noise=noise)
    return params if arrays is None else params.with_arrays(arrays)


# ---------------------------------------------------------------- new items (server-side post-processing)

def new_item_bias(bias: np.ndarray, text_embeddings: np.ndarray, new_items: np.ndarray, *,
                  lambdas: Sequence[float] = (0.1, 1.0, 10.0, 100.0), folds: int = 5, seed: int = 0
                  ) -> tuple[np.ndarray, float]:
    """Biases for items nobody has interacted with yet, predicted from their text.

    A ridge regression (intercept unpenalised) of the released biases of the other items on
    their sentence embeddings, λ chosen by ``folds``-fold cross-validation (mean squared error)
    among ``lambdas``. It reads only released parameters and public texts: post-processing,
    no privacy cost. Returns (predicted biases of the new items in increasing index order,
    chosen λ)."""
    X = np.asarray(text_embeddings, dtype=np.float64)
    y = np.asarray(bias, dtype=np.float64)
    new = np.zeros(len(y), dtype=bool)
    new[np.asarray(new_items, dtype=np.int64)] = True
    known = np.flatnonzero(~new)
    if len(known) < folds:
        raise ValueError(f"need at least {folds} items with a trained bias, got {len(known)}")

    def fit(rows: np.ndarray, lam: float) -> np.ndarray:
        Xa = np.c_[X[rows], np.ones(len(rows))]
        reg = lam * np.eye(Xa.shape[1])
        reg[-1, -1] = 0.0
        return np.linalg.solve(Xa.T @ Xa + reg, Xa.T @ y[rows])

    def predict(w: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.c_[X[rows], np.ones(len(rows))] @ w

    fold = np.random.default_rng(seed).permutation(len(known)) % folds
    errors = []
    for lam in lambdas:
        err = 0.0
        for f in range(folds):
            train, test = known[fold != f], known[fold == f]
            err += float(np.sum((predict(fit(train, lam), test) - y[test]) ** 2))
        errors.append(err)
    lam = float(lambdas[int(np.argmin(errors))])
    return predict(fit(known, lam), np.flatnonzero(new)).astype(np.float32), lam
