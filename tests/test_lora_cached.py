"""Affordable LoRA: adapters on MiniLM's top layer over cached frozen layers below it.

The cached encoders must compute exactly what the full adapted MiniLM computes (the server, a
device or the edge int8 path may run the full model on the same adapter), train only the adapter
and head, and cost a fraction of the full model's step. Real MiniLM weights, one CPU thread.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.models.hybrid.encoder import TextItemEncoder, item_vectors, load_trainable_state, trainable_state
from common.models.hybrid.text import CachedFfnOutEncoder, CachedLowerEncoder, TextSide, index_tokens
from tests.test_text_encoder import TITLES

torch.set_num_threads(1)


def perturbed(encoder, seed: int = 0) -> dict[str, np.ndarray]:
    """The encoder's adapter state with every array moved (LoRA B ≠ 0: the adapter does something)."""
    rng = np.random.default_rng(seed)
    return {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in trainable_state(encoder).items()}


@pytest.mark.parametrize(("cached_cls", "kwargs"), [
    (CachedLowerEncoder, {"lora_layers": 1, "lora_target": "qv"}),
    (CachedLowerEncoder, {"lora_layers": 2, "lora_target": "qv"}),
    (CachedFfnOutEncoder, {"lora_layers": 1, "lora_target": "ffn-out"}),
])
def test_a_cached_encoder_computes_what_the_full_adapted_model_computes(cached_cls, kwargs):
    if cached_cls is CachedLowerEncoder:
        cached = cached_cls(TITLES, 16, lora_layers=kwargs["lora_layers"], max_length=32, seed=4)
    else:
        cached = cached_cls(TITLES, 16, max_length=32, seed=4)
    full = TextItemEncoder(16, lora=True, seed=4, **kwargs)
    assert list(trainable_state(cached)) == list(trainable_state(full))
    state = perturbed(full)
    load_trainable_state(cached, state)
    load_trainable_state(full, state)
    want = item_vectors(full, TITLES)
    np.testing.assert_allclose(cached.all_vectors(), want, atol=1e-5)
    # and the adapter matters: with B = 0 the vectors are the frozen model's
    load_trainable_state(cached, {k: (0 * v if "lora_B" in k else v) for k, v in state.items()})
    assert np.abs(cached.all_vectors() - want).max() > 1e-3


def test_ffn_out_adapts_the_top_layers_feed_forward_output_only():
    keys = [k for k in trainable_state(TextItemEncoder(8, lora=True, lora_layers=1, lora_target="ffn-out"))
            if k.startswith("lora.")]
    assert keys and all(".layer.5.output.dense.lora_" in k for k in keys)
    assert not any("attention" in k for k in keys)
    qv = [k for k in trainable_state(TextItemEncoder(8, lora=True, lora_layers=2)) if k.startswith("lora.")]
    assert {k.split(".layer.")[1].split(".")[0] for k in qv} == {"4", "5"}


def test_a_cached_step_trains_the_adapter_and_head_and_nothing_else():
    enc = CachedFfnOutEncoder(TITLES, 8, max_length=32, seed=1)
    load_trainable_state(enc, perturbed(enc))
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    buffers = enc.x.clone(), enc.z.clone()
    tok = index_tokens(len(TITLES))
    optimizer = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=0.5)
    enc(tok["input_ids"][:4], tok["attention_mask"][:4]).pow(2).sum().backward()
    optimizer.step()
    moved = {n for n, p in enc.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in enc.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved) and "head.weight" in moved
    assert torch.equal(enc.x, buffers[0]) and torch.equal(enc.z, buffers[1])


def test_a_cached_ffn_step_is_many_times_cheaper_than_the_full_models():
    cached = CachedFfnOutEncoder(TITLES, 16, max_length=32, seed=0)
    full = TextItemEncoder(16, lora=True, seed=0, lora_layers=1, lora_target="ffn-out")
    from common.models.hybrid.encoder import tokenize

    real = tokenize(TITLES)
    idx = index_tokens(len(TITLES))

    def step(encoder, tokens) -> float:
        start = time.process_time()
        for _ in range(5):
            encoder(tokens["input_ids"], tokens["attention_mask"]).sum().backward()
        return time.process_time() - start

    step(cached, idx)
    step(full, real)
    assert step(cached, idx) * 5 < step(full, real)


def test_the_text_side_reuses_the_catalogue_pass_for_the_same_adapter_only():
    side = TextSide(TITLES, dim=8, lora=True, max_length=32, seed=0, lora_layers=1, lora_target="ffn-out")
    state = perturbed(side.encoder)
    first = side.vectors(state)
    first[:] = 0  # a caller writing into its copy does not change the cache
    again = side.vectors(state)
    assert np.abs(again).max() > 0
    other = side.vectors(perturbed(side.encoder, seed=1))
    assert np.abs(other - again).max() > 1e-4


@pytest.mark.parametrize(("flat", "message"), [
    ({"model.lora-target": "ffn-out", "model.lora-layers": 2}, "top layer only"),
    ({"model.lora-target": "kv"}, "lora-target"),
    ({"model.lora-layers": 7}, "lora-layers"),
])
def test_the_lora_settings_are_checked(flat, message):
    with pytest.raises(ValueError, match=message):
        RunConfig().replace(**flat)


def test_the_server_steps_lora_arrays_at_their_own_scale(tmp_path, monkeypatch):
    """A LoRA step moves every item's text vector: its arrays get model.lora-step-scale of the head's rate."""
    from common.models import build_model

    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig.from_flat({"model.kind": "hybrid", "model.dim": 8, "model.lora": True,
                               "model.text-step-scale": 0.5, "model.lora-step-scale": 0.1})
    model = build_model(cfg.model, n_items=len(TITLES), seed=0, texts=lambda: TITLES)
    params = model.init(0)
    scales = dict(zip(model.names(params), model.server_lr_scales(params)))
    assert [scales[k] for k in model.names(params)[:2]] == [1.0, 1.0]
    lora = {k: v for k, v in scales.items() if k.startswith("lora.")}
    head = {k: v for k, v in scales.items() if k.startswith("head.")}
    assert lora and all(v == pytest.approx(0.05) for v in lora.values())
    assert head and set(head.values()) == {0.5}
