"""The hybrid recommender, federated: MF item vectors plus a language-model text part.

``model.kind = "hybrid"``: the vector of item i is ``free_i + text_i`` with
``text_i = head(encoder(text of item i))``, where the encoder is the frozen MiniLM base (with
LoRA adapters when ``model.lora``) and ``head`` a ``Linear(384, dim)``. Users are reconstructed
on the device exactly as in MF (:func:`common.models.reconstruction.fit_user` on the effective item vectors).

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
take the MF step on free/bias (:func:`common.models.mf.model.client_train`, unchanged, with
embeddings = free + text, so the update of the effective embeddings is the update of the free
part), then :func:`common.models.hybrid.train.adapter_update` on its positives (at most ``model.text-positives``,
sampled) + ``model.text-negatives`` sampled negatives for the head (+ LoRA) update. That is one
SGD step, so ``model.text-lr`` only sets the adapter's weight against the free part inside the
clipped update (the server's FedAdam normalises each coordinate). With a frozen encoder the sentence embeddings of the items are
deterministic, so they are computed once per process (and cached on disk) and the head step
runs on them (:class:`PrecomputedBaseEncoder`): no transformer pass per round.

``model.residual-dropout`` p > 0 (DropoutNet): each round a share p of the items, drawn from a
public stream keyed by (seed, round) so every device drops the same ones, enters both steps
through its text alone (free embedding 0, bias the mean received bias) and its free part gets
no update (:func:`common.models.hybrid.train.dropped_items`). 0 (default): off.

Items nobody interacted with still have a text vector, so they can be ranked from their text;
``common.models.hybrid.blend.hybrid_item_params(..., cold_items=...)`` drops their (never trained) free part
for items the catalogue marks as new.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from common import keys
from common.choices import ModelKind
from common.config import ModelConfig
from common.models.contract import ClientData, DeviceStep, ItemParams
from common.models.hybrid.params import ADAPTER_HEAD, HybridParams
from common.models.hybrid.text import TextSide, text_side
from common.models.hybrid.train import hybrid_client_train
from common.models.mf.params import init_items
from common.privacy.dp_fedavg import clip_grouped


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


def extend_optimizer(optimizer: Any, old: HybridParams, new: HybridParams) -> None:
    """Give ``optimizer`` zero moments for the arrays ``new`` has beyond ``old`` (appended last)."""
    old_names, new_names = old.names(), new.names()
    if new_names[:len(old_names)] != old_names:
        raise ValueError("the new parameters must extend the old ones at the end")
    if optimizer.m:
        for a in new.to_arrays()[len(old_names):]:
            optimizer.m.append(np.zeros(a.shape))
            optimizer.v.append(np.zeros(a.shape))


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



class HybridModel:
    """:class:`~common.models.contract.ItemModel` for the hybrid: the free item part and the
    text side's adapter train; the item text vectors are the context the server computes."""

    kind = ModelKind.HYBRID
    context_names: tuple[str, ...] = (keys.TEXT_VECTORS_NAME,)

    def __init__(self, config: ModelConfig, n_items: int, texts: Callable[[], Sequence[str]], seed: int, *,
                 side: TextSide | None = None) -> None:
        self.config, self.n_items, self.seed = config, n_items, seed
        self.side: TextSide = side if side is not None else text_side(texts(), config, seed)
        if self.side.n_items != n_items:
            raise ValueError(f"{n_items} items in the model but {self.side.n_items} item texts")

    def init(self, seed: int) -> HybridParams:
        return init_hybrid(init_items(self.n_items, self.config.dim, seed=seed, scale=self.config.init_scale), self.side)

    def names(self, params: HybridParams) -> tuple[str, ...]:
        return params.names()

    def arrays(self, params: HybridParams) -> list[np.ndarray]:
        return params.to_arrays()

    def with_arrays(self, params: HybridParams, arrays: Sequence[np.ndarray]) -> HybridParams:
        return params.with_arrays(arrays)

    def context(self, params: HybridParams) -> list[np.ndarray]:
        return [self.side.vectors(params.adapter)]

    def receive(self, arrays: Sequence[np.ndarray], instruction: Mapping[str, Any]) -> tuple[HybridParams, list]:
        n = int(instruction.get(keys.TRAINABLE_ARRAYS, 2 + len(self.side.adapter_names)))
        params, text = split_arrays(arrays, n, self.side.adapter_names)
        return params, [text]

    def named(self, params: HybridParams) -> dict[str, np.ndarray]:
        return params.named_arrays()

    def from_named(self, named: Mapping[str, np.ndarray]) -> HybridParams:
        return HybridParams.from_named({k: v for k, v in named.items() if not k.startswith("opt.")})

    def metadata(self, params: HybridParams) -> dict[str, str]:
        lora = any(k.startswith("lora.") for k in params.adapter)
        return {"format": "fedrec-hybrid-items", "dim": str(params.dim),
                "text_encoder": "all-MiniLM-L6-v2 (frozen) + head" + (" + LoRA" if lora else "")}

    def server_lr_scales(self, params: HybridParams) -> list[float]:
        """The free part at the server's rate, the head at ``model.text-step-scale`` of it, the LoRA
        arrays at ``model.lora-step-scale`` of that (a LoRA step moves every item's text vector)."""
        text, lora = self.config.text_step_scale, self.config.text_step_scale * self.config.lora_step_scale
        return [1.0, 1.0] + [lora if name.startswith("lora.") else text for name in params.adapter_names]

    def clip(self, arrays: Sequence[np.ndarray], clip: float, bias_share: float) -> list[np.ndarray]:
        return clip_grouped(list(arrays), clip, bias_share)

    def train(self, params: HybridParams, context: Sequence[np.ndarray], data: ClientData, *, epochs: int,
              lr: float, seed: int, server_round: int) -> DeviceStep:
        arrays, loss, vectors, text_loss = hybrid_client_train(params, context[0], data, self.side, model=self.config,
                                                               epochs=epochs, lr=lr, seed=seed,
                                                               server_round=server_round)
        return DeviceStep(arrays, loss, vectors, {keys.M_TEXT_LOSS: text_loss})

    def effective(self, params: HybridParams, context: Sequence[np.ndarray]) -> ItemParams:
        return params.effective(context[0])

    def adopt(self, params: HybridParams, optimizer: Any) -> HybridParams:
        """Parameters of an earlier run to continue with this model: when this one trains LoRA and
        they have none (frozen rounds, then LoRA), the LoRA arrays are added (B = 0, so the text
        vectors do not change) with zero optimizer moments."""
        if self.side.lora and not any(k not in ADAPTER_HEAD for k in params.adapter):
            extended = add_lora(params, self.side)
            extend_optimizer(optimizer, params, extended)
            return extended
        return params
