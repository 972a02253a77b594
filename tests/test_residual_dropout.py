"""DropoutNet-style training of the hybrid (``model.residual-dropout``): 0 is exactly the plain
hybrid step; p > 0 trains the items of the round's public draw through their text alone, so
their free part (embedding and bias) neither reaches the loss nor gets an update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import keys
from common.config import RunConfig
from common.models import ClientData, UserData, build_model
from common.models.hybrid.encoder import load_trainable_state, trainable_state
from common.models.hybrid.train import adapter_rng, adapter_update, dropped_items
from common.models.mf.model import client_train
from tests.conftest import ITEM_TEXTS

DIM = 6
USER_ITEMS = np.array([0, 1, 2, 5, 7], dtype=np.int64)
torch.set_num_threads(1)


@pytest.fixture
def build(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path_factory.getbasetemp() / "fedrec-cache"))

    def make(p: float):
        cfg = RunConfig.from_flat({"model.kind": "hybrid", "model.dim": DIM, "model.text-negatives": 4,
                                   "model.residual-dropout": p})
        return build_model(cfg.model, n_items=len(ITEM_TEXTS), seed=0, texts=lambda: ITEM_TEXTS)
    return make


def client() -> ClientData:
    return ClientData(0, (0,), (UserData(USER_ITEMS, np.ones(len(USER_ITEMS), np.float32)),),
                      (np.array([3], np.int64),), (np.array([4], np.int64),))


def trained_params(model):
    """Initial parameters moved off their initial values (a non-zero head and biases)."""
    params = model.init(seed=0)
    rng = np.random.default_rng(1)
    params.free.embeddings[:] += rng.normal(0, 0.3, params.free.embeddings.shape).astype(np.float32)
    params.free.bias[:] = rng.normal(0, 0.5, params.free.bias.shape).astype(np.float32)
    for v in params.adapter.values():
        v[...] += rng.normal(0, 0.05, v.shape).astype(np.float32)
    return params


def step(model, params, server_round: int = 3):
    return model.train(params, model.context(params), client(), epochs=1, lr=1.0, seed=0, server_round=server_round)


def test_zero_is_exactly_the_plain_hybrid_step(build):
    model = build(0.0)
    params = trained_params(model)
    text = model.context(params)[0]
    got = step(model, params)
    # the plain hybrid step, composed by hand: the MF step on free + text, then the head step on the received free part
    update, loss, vectors = client_train(params.effective(text), client(), model=model.config, epochs=1, lr=1.0,
                                         seed=0, server_round=3)
    side = model.side
    load_trainable_state(side.encoder, params.adapter)
    _, text_loss = adapter_update(side.encoder, params.free, client().trainable[0], side.tokens, user_vector=vectors[0],
                                  negatives_rng=adapter_rng(0, 3, 0), n_neg=model.config.text_negatives,
                                  lr=model.config.text_lr, epochs=1)
    new = trainable_state(side.encoder)
    expected = [update.embeddings, update.bias, *(new[k] - params.adapter[k] for k in params.adapter_names)]
    assert len(got.update) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(got.update, expected))
    assert got.loss == loss and all(np.array_equal(a, b) for a, b in zip(got.user_vectors, vectors))
    assert got.metrics[keys.M_TEXT_LOSS] == text_loss
    assert dropped_items(len(ITEM_TEXTS), 0.0, 0, 3).size == 0


def test_the_draw_is_public_and_has_the_share_p():
    a, b = dropped_items(20_000, 0.3, 7, 5), dropped_items(20_000, 0.3, 7, 5)
    assert np.array_equal(a, b)  # keyed by (seed, round) only: every device draws the same items
    assert not np.array_equal(a, dropped_items(20_000, 0.3, 7, 6))
    assert abs(len(a) / 20_000 - 0.3) < 0.02
    with pytest.raises(ValueError):
        dropped_items(10, 1.0, 0, 1)


def test_a_dropped_items_free_part_never_reaches_the_loss(build):
    model = build(0.5)
    n = len(ITEM_TEXTS)
    rnd = next(r for r in range(1, 200)
               if 2 <= len(np.intersect1d(dropped_items(n, 0.5, 0, r), USER_ITEMS)) < len(USER_ITEMS))
    dropped = dropped_items(n, 0.5, 0, rnd)
    kept_user_item = int(np.setdiff1d(USER_ITEMS, dropped)[0])
    params = trained_params(model)
    base = step(model, params, rnd)
    # the update of a dropped item's free part is 0
    assert not base.update[0][dropped].any() and not base.update[1][dropped].any()

    # its free embedding: any value gives bit for bit the same step
    moved = params.copy()
    moved.free.embeddings[dropped] = np.random.default_rng(2).normal(0, 100, (len(dropped), DIM)).astype(np.float32)
    again = step(model, moved, rnd)
    assert all(np.array_equal(a, b) for a, b in zip(base.update, again.update))
    assert base.loss == again.loss and all(np.array_equal(a, b) for a, b in zip(base.user_vectors, again.user_vectors))
    assert base.metrics == again.metrics

    # its free bias: only the mean of the received biases is used (a change that keeps it keeps the step)
    shifted = params.copy()
    delta = np.zeros(len(dropped), np.float32)
    delta[0], delta[1] = 3.0, -3.0
    shifted.free.bias[dropped] += delta
    again = step(model, shifted, rnd)
    for a, b in zip(base.update, again.update):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    # the control: a kept item's free part does reach the loss
    control = params.copy()
    control.free.embeddings[kept_user_item] += 1.0
    assert not np.allclose(step(model, control, rnd).update[0], base.update[0])
