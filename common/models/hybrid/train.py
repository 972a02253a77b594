"""The hybrid device step: the MF step on the effective item vectors (free + text), then one step
of the text side (head, and LoRA when on) on the user's positives and sampled negatives.

With ``model.residual-dropout`` p > 0 (DropoutNet, Volkovs et al., NeurIPS 2017) a share p of
the items (:func:`dropped_items`: a public stream keyed by seed and round, the same on every
device, so it reveals nothing about the device's data) is seen in both steps through its text
alone: vector ``text_i`` (free embedding 0), bias the mean of the received biases (the text side
has no bias of its own), and its free embedding and bias get no update this round. The text part
is thereby trained to be a usable item vector on the warm items' scale, as a new item needs."""

from __future__ import annotations

import numpy as np
import torch

from common.config import ModelConfig
from common.models.contract import ClientData, ItemParams, UserData
from common.models.hybrid.encoder import TextItemEncoder, load_trainable_state, trainable_parameters, trainable_state
from common.models.hybrid.params import HybridParams
from common.models.hybrid.text import TextSide
from common.models.mf.model import client_train
from common.models.reconstruction import sample_negatives
from common.streams import Stream, generator


def adapter_rng(seed: int, server_round: int, client_id: int) -> np.random.Generator:
    """The adapter step's negatives: a stream separate from the MF step's."""
    return generator(Stream.ADAPTER, seed, server_round, client_id)


def dropped_items(n_items: int, p: float, seed: int, server_round: int) -> np.ndarray:
    """The items whose free part is dropped this round (sorted indices): each with probability
    ``p``, from the public stream (seed, round). Empty when ``p`` is 0 (nothing is drawn)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"residual dropout must be in [0, 1), got {p}")
    if p == 0.0:
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(generator(Stream.RESIDUAL_DROPOUT, seed, server_round).random(n_items) < p)


def drop_free(free: ItemParams, dropped: np.ndarray) -> ItemParams:
    """``free`` with the rows ``dropped`` replaced: embedding 0, bias the mean received bias."""
    if len(dropped) == 0:
        return free
    embeddings, bias = free.embeddings.copy(), free.bias.copy()
    embeddings[dropped] = 0.0
    bias[dropped] = np.float32(free.bias.mean())
    return ItemParams(embeddings, bias)


def adapter_update(encoder: TextItemEncoder, free: ItemParams, user: UserData, item_tokens: dict[str, torch.Tensor],
                   *, user_vector: np.ndarray, negatives_rng: np.random.Generator, n_neg: int, lr: float,
                   epochs: int) -> tuple[dict[str, np.ndarray], float]:
    """One client's local training of the text side (LoRA + head) for one user.

    Each epoch samples ``n_neg`` negatives (uniform over the items the user has not seen),
    encodes only the user's positives and those negatives (from the pre-tokenised
    ``item_tokens``: ``input_ids``/``attention_mask`` rows for all items), scores them as
    ``s_i = u·(free_i + head(text_i)) + b_i`` and takes one SGD step on the sampled softmax
    loss ``logsumexp(s over positives ∪ negatives) − mean(s over positives)``. The free
    embeddings, biases and user vector stay fixed; the base model is frozen.

    Returns the update ``new − received`` of :func:`trainable_state` (same keys) and the loss
    before the last step. The encoder is left holding the trained weights (its training mode is
    restored); load the received state to undo. Cost: one forward/backward over
    ``len(user.items) + n_neg`` texts per epoch.
    """
    if len(user.items) == 0:
        raise ValueError("adapter_update needs a user with at least one training item")
    if epochs < 1 or n_neg < 1 or lr <= 0:
        raise ValueError(f"need epochs ≥ 1, n_neg ≥ 1 and lr > 0, got {epochs}, {n_neg}, {lr}")
    received = trainable_state(encoder)
    u = torch.as_tensor(np.asarray(user_vector, dtype=np.float32))
    V = torch.from_numpy(np.asarray(free.embeddings, dtype=np.float32))
    b = torch.from_numpy(np.asarray(free.bias, dtype=np.float32))
    pos = np.asarray(user.items, dtype=np.int64)
    optimizer = torch.optim.SGD(trainable_parameters(encoder), lr=lr)
    was_training = encoder.training
    encoder.train()
    loss_value = float("nan")
    try:
        for _ in range(epochs):
            neg = sample_negatives(pos, free.n_items, n_neg, negatives_rng)
            idx = torch.from_numpy(np.concatenate([pos, neg]))
            text = encoder(item_tokens["input_ids"][idx], item_tokens["attention_mask"][idx])
            scores = (V[idx] + text) @ u + b[idx]
            loss = torch.logsumexp(scores, 0) - scores[: len(pos)].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
    finally:
        encoder.train(was_training)
    new = trainable_state(encoder)
    return {k: new[k] - received[k] for k in received}, loss_value



def hybrid_client_train(params: HybridParams, text_vectors: np.ndarray, data: ClientData, side: TextSide, *,
                        model: ModelConfig, epochs: int, lr: float, seed: int, server_round: int
                        ) -> tuple[list[np.ndarray], float, list[np.ndarray], float]:
    """One client's hybrid round: (update of the trainable arrays in travel order, MF loss,
    user vectors to keep on the device, text-side loss). ``ValueError`` without interactions.

    ``model.residual_dropout`` > 0: the items :func:`dropped_items` draws are trained text-only
    (see the module docstring); their rows of the free update are 0."""
    dropped = dropped_items(params.n_items, model.residual_dropout, seed, server_round)
    free = drop_free(params.free, dropped)
    update, loss, vectors = client_train(HybridParams(free, params.adapter).effective(text_vectors), data, model=model,
                                         epochs=epochs, lr=lr, seed=seed, server_round=server_round)
    if len(dropped):
        update.embeddings[dropped] = 0.0
        update.bias[dropped] = 0.0
    load_trainable_state(side.encoder, params.adapter)
    rng = adapter_rng(seed, server_round, data.client_id)
    text_losses = []
    for user, vector in zip(data.trainable, vectors):  # a silo chains its users' steps
        if len(user.items) > model.text_positives:  # bounds a heavy user's cost and memory
            keep = np.sort(rng.choice(len(user.items), size=model.text_positives, replace=False))
            user = UserData(user.items[keep], user.ratings[keep])
        _, text_loss = adapter_update(side.encoder, free, user, side.tokens, user_vector=vector,
                                      negatives_rng=rng, n_neg=model.text_negatives, lr=model.text_lr, epochs=epochs)
        text_losses.append(text_loss)
    new = trainable_state(side.encoder)
    delta = [new[k] - params.adapter[k] for k in params.adapter_names]
    return [update.embeddings, update.bias, *delta], loss, vectors, float(np.mean(text_losses))
