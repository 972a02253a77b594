"""The hybrid device step: the MF step on the effective item vectors (free + text), then one step
of the text side (head, and LoRA when on) on the user's positives and sampled negatives."""

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
