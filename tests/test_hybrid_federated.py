"""The hybrid model, federated (common/models/hybrid/): what travels, per-group clipping, the
client's round, the server's release and text vectors, the ledger, checkpoints; a tiny Ray
federation with SecAgg+ and DP (slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import keys
from common.config import RunConfig
from common.models import ClientData, UserData
from common.models.hybrid.blend import new_item_bias
from common.models.hybrid.encoder import TextItemEncoder, encode_base, item_vectors
from common.models.hybrid.model import HybridModel, add_lora, extend_optimizer, init_hybrid, split_arrays
from common.models.hybrid.params import HybridParams, adapter_order
from common.models.hybrid.text import PrecomputedBaseEncoder, TextSide, base_embeddings, index_tokens
from common.models.hybrid.train import hybrid_client_train
from common.models.mf.model import client_train
from common.models.mf.params import init_items
from common.privacy.dp_fedavg import GaussianNoise, clip_grouped, global_norm
from common.rounds import RoundEngine, ServerOptimizer, server_update_arrays
from tests.conftest import ITEM_TEXTS as TEXTS

torch.set_num_threads(1)

DIM = 8


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path_factory.getbasetemp() / "fedrec-cache"))


@pytest.fixture(scope="module")
def frozen_side(tmp_path_factory) -> TextSide:
    with pytest.MonkeyPatch.context() as mp:  # the base embeddings' disk cache: not the user's
        mp.setenv("FEDREC_CACHE", str(tmp_path_factory.getbasetemp() / "fedrec-cache"))
        return TextSide(TEXTS, dim=DIM, lora=False, max_length=32, seed=3)


def hybrid_cfg(**flat) -> RunConfig:
    return RunConfig.from_flat({"model.kind": "hybrid", "model.dim": DIM, "model.text-negatives": 4, **flat})


def client(items: list[int], cid: int = 0) -> ClientData:
    items_arr = np.array(items, dtype=np.int64)
    return ClientData(cid, (cid,), (UserData(items_arr, np.ones(len(items), np.float32)),),
                      (np.array([], np.int64),), (np.array([], np.int64),))


# ---------------------------------------------------------------- config

def test_model_kind_defaults_to_mf_and_is_validated():
    cfg = RunConfig()
    assert cfg.model.kind == "mf" and cfg.model.lora is False and cfg.model.text_max_length == 32
    assert RunConfig.from_flat({"model.kind": "hybrid", "model.lora": "true"}).model.lora is True
    for key, value in [("model.kind", "transformer"), ("model.text-max-length", 0), ("model.text-lr", 0.0),
                       ("model.text-negatives", 0), ("model.text-positives", 0)]:
        with pytest.raises(ValueError, match=key):
            RunConfig.from_flat({key: value})


# ---------------------------------------------------------------- what travels

def test_hybrid_params_travel_order_names_and_round_trips():
    rng = np.random.default_rng(0)
    adapter = {"lora.b": rng.standard_normal((3, 2)).astype(np.float32), "head.bias": np.zeros(DIM, np.float32),
               "head.weight": rng.standard_normal((DIM, 384)).astype(np.float32),
               "lora.a": rng.standard_normal((2, 3)).astype(np.float32)}
    params = HybridParams(init_items(5, DIM, seed=0), adapter)
    assert params.names() == ("item_embeddings", "item_bias", "head.weight", "head.bias", "lora.a", "lora.b")
    arrays = params.to_arrays()
    assert [a.shape for a in arrays] == [(5, DIM), (5,), (DIM, 384), (DIM,), (2, 3), (3, 2)]
    again = HybridParams.from_arrays(arrays, adapter_order(adapter))
    for a, b in zip(again.to_arrays(), arrays):
        assert np.array_equal(a, b)
    named = HybridParams.from_named(params.named_arrays())
    assert named.names() == params.names()
    # an instruction = trainable arrays + the text vectors; evaluation needs no encoder
    text = rng.standard_normal((5, DIM)).astype(np.float32)
    got, vectors = split_arrays([*arrays, text], len(arrays), adapter_order(adapter))
    assert got.names() == params.names() and np.array_equal(vectors, text)
    eff = got.effective(vectors)
    np.testing.assert_allclose(eff.embeddings, params.free.embeddings + text)
    assert np.array_equal(eff.bias, params.free.bias)
    with pytest.raises(ValueError):
        split_arrays([*arrays, text[:, :2]], len(arrays), adapter_order(adapter))
    with pytest.raises(ValueError):
        split_arrays(arrays, len(arrays), adapter_order(adapter))  # the text vectors are missing


def test_clipping_keeps_the_bias_share_and_puts_embeddings_and_adapter_together():
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((6, 4)) * 3, rng.standard_normal(6) * 5, rng.standard_normal((4, 7)) * 2,
              rng.standard_normal(4)]
    clip, share = 1.0, 0.05
    out = clip_grouped([a.astype(np.float32) for a in arrays], clip, share)
    assert global_norm(out) <= clip * (1 + 1e-6)
    assert global_norm([out[1]]) <= clip * np.sqrt(share) * (1 + 1e-6)
    assert global_norm([out[0], *out[2:]]) <= clip * np.sqrt(1 - share) * (1 + 1e-6)
    # the embeddings and the adapter are scaled by one factor (one group)
    assert np.allclose(out[0] / arrays[0], (out[2] / arrays[2]).flat[0], rtol=1e-5)
    # with no adapter arrays it is exactly MF's clipping; flat clipping when share ≤ 0
    mf = [arrays[0].astype(np.float32), arrays[1].astype(np.float32)]
    for a, b in zip(clip_grouped(mf, clip, share), clip_grouped(mf, clip, share)):
        assert np.array_equal(a, b)
    flat = clip_grouped([a.astype(np.float32) for a in arrays], clip, 0.0)
    assert global_norm(flat) == pytest.approx(clip, rel=1e-5)


# ---------------------------------------------------------------- the text side

def test_precomputed_base_encoder_is_the_frozen_encoder():
    frozen = TextItemEncoder(DIM, lora=False, seed=3)
    fast = PrecomputedBaseEncoder(encode_base(TEXTS), DIM, seed=3)
    for a, b in zip(frozen.head.parameters(), fast.head.parameters()):
        assert torch.equal(a, b)
    np.testing.assert_allclose(fast.all_vectors(), item_vectors(frozen, TEXTS), atol=1e-5)
    tok = index_tokens(len(TEXTS))
    np.testing.assert_allclose(fast(tok["input_ids"][[2, 7]], tok["attention_mask"][[2, 7]]).detach().numpy(),
                               fast.all_vectors()[[2, 7]], atol=1e-6)
    assert [n for n, p in fast.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_base_embeddings_are_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path))
    texts = TEXTS[:3] + ["a text only this test uses"]
    first = base_embeddings(texts, 16)
    assert len(list((tmp_path / "text").glob("minilm-*.npy"))) == 1
    np.testing.assert_allclose(first, encode_base(texts, max_length=16), atol=1e-6)


# ---------------------------------------------------------------- one client's round

def test_client_round_is_the_mf_step_plus_an_adapter_step(frozen_side):
    cfg = hybrid_cfg()
    params = init_hybrid(init_items(len(TEXTS), DIM, seed=0, scale=0.1), frozen_side)
    text = frozen_side.vectors(params.adapter)
    data = client([0, 1, 2, 9], cid=4)
    arrays, loss, vectors, text_loss = hybrid_client_train(params, text, data, frozen_side, model=cfg.model,
                                                           epochs=1, lr=1.0, seed=0, server_round=3)
    # one update per trainable array, none for the text vectors
    assert [a.shape for a in arrays] == [a.shape for a in params.to_arrays()]
    # the free part's update is MF's update with embeddings = free + text, unchanged
    mf, mf_loss, mf_vectors = client_train(params.effective(text), data, model=cfg.model, epochs=1, lr=1.0, seed=0,
                                           server_round=3)
    assert np.array_equal(arrays[0], mf.embeddings) and np.array_equal(arrays[1], mf.bias) and loss == mf_loss
    assert np.array_equal(vectors[0], mf_vectors[0])
    assert np.abs(arrays[2]).max() > 0 and np.isfinite(text_loss)
    # deterministic for (seed, round, client), and the shared encoder is reloaded each time
    again = hybrid_client_train(params, text, data, frozen_side, model=cfg.model, epochs=1, lr=1.0, seed=0,
                                server_round=3)[0]
    for a, b in zip(arrays, again):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError):
        hybrid_client_train(params, text, client([]), frozen_side, model=cfg.model, epochs=1, lr=1.0, seed=0,
                            server_round=3)


def test_heavy_users_train_the_adapter_on_a_sample_of_positives(frozen_side):
    cfg = hybrid_cfg(**{"model.text-positives": 2})
    params = init_hybrid(init_items(len(TEXTS), DIM, seed=0, scale=0.1), frozen_side)
    text = frozen_side.vectors(params.adapter)
    arrays = hybrid_client_train(params, text, client([0, 1, 2, 3, 4, 5]), frozen_side, model=cfg.model, epochs=1,
                                 lr=1.0, seed=0, server_round=1)[0]
    assert np.abs(arrays[2]).max() > 0


# ---------------------------------------------------------------- the server's release

def test_server_release_noises_every_trainable_array_and_recomputes_text_vectors(frozen_side):
    cfg = hybrid_cfg(**{"dp.noise-multiplier": 1.0})
    params = init_hybrid(init_items(len(TEXTS), DIM, seed=0), frozen_side)
    opt = ServerOptimizer("sgd", 1.0)
    zero = [np.zeros(a.shape) for a in params.to_arrays()]
    new = params.with_arrays(server_update_arrays(params.to_arrays(), zero, 0, optimizer=opt, dp=cfg.dp,
                                                  expected_cohort=2.0, noise=GaussianNoise(0)))
    assert new.names() == params.names()
    for name in params.names():  # a noise-only release moves every array
        assert not np.array_equal(new.named_arrays()[name], params.named_arrays()[name]), name
    assert not np.allclose(frozen_side.vectors(new.adapter), frozen_side.vectors(params.adapter))
    same = server_update_arrays(params.to_arrays(), None, 0, optimizer=opt, dp=None, expected_cohort=2.0,
                                noise=GaussianNoise(0))
    assert same is None  # no DP, nobody reported: unchanged


def test_strategy_sends_text_vectors_as_context_and_names_the_adapter_in_the_ledger(frozen_side, tmp_path):
    from server.run_dir import RunDir
    from server.strategy import FedRecStrategy

    cfg = hybrid_cfg(**{"dp.noise-seed": 0})
    model = HybridModel(cfg.model, len(TEXTS), lambda: TEXTS, 0, side=frozen_side)
    engine = RoundEngine(cfg, model)
    params = engine.params
    run_dir = RunDir.create(tmp_path, cfg)
    strategy = FedRecStrategy(cfg, run_dir, engine, grid=None)
    out = engine.outgoing()
    assert len(out) == len(params.to_arrays()) + 1
    np.testing.assert_array_equal(out[-1], frozen_side.vectors(params.adapter))
    instruction = engine.instruction(1, secure_aggregation=False)
    assert instruction[keys.TRAINABLE_ARRAYS] == 4 and instruction[keys.CONTEXT_ARRAYS] == keys.TEXT_VECTORS_NAME
    event = engine.event(1)
    assert event.parameters == params.names() and {"head.weight", "head.bias"} <= set(event.parameters)
    strategy.current_round = 1
    strategy._release(None, 0)  # a noise-only release (DP on)
    assert not np.array_equal(engine.params.adapter["head.weight"], params.adapter["head.weight"])
    np.testing.assert_array_equal(engine.outgoing()[-1], frozen_side.vectors(engine.params.adapter))
    assert engine.ledger.events[0].parameters == params.names()
    # checkpoints and the final model keep every released array by name
    run_dir.save_checkpoint(1, *engine.state())
    rnd, named, opt_state, extra = run_dir.load_checkpoint()
    restored = RoundEngine.restore(cfg, model, named, opt_state, extra)
    assert rnd == 1 and isinstance(restored.params, HybridParams) and restored.params.names() == params.names()
    for name, array in engine.params.named_arrays().items():
        np.testing.assert_array_equal(restored.params.named_arrays()[name], array)
    run_dir.save_model(model.named(engine.params), model.metadata(engine.params))
    from common.serialization import load_arrays

    assert set(load_arrays(run_dir.path / "model.safetensors")) == set(params.names())


def test_mf_strategy_sends_exactly_the_mf_arrays(tmp_path):
    from common.models.mf.model import MFModel

    cfg = RunConfig.from_flat({"model.dim": DIM})
    engine = RoundEngine(cfg, MFModel(cfg.model, 7))
    out = engine.outgoing()
    assert len(out) == 2 and out[0] is engine.params.embeddings and out[1] is engine.params.bias
    assert engine.event(1).parameters == keys.ITEM_PARAM_NAMES
    assert keys.TRAINABLE_ARRAYS not in engine.instruction(1, secure_aggregation=False)


# ---------------------------------------------------------------- frozen rounds, then LoRA rounds

def test_adding_lora_keeps_the_text_vectors_and_the_trained_head(frozen_side):
    lora_side = TextSide(TEXTS, dim=DIM, lora=True, max_length=32, seed=3)
    params = init_hybrid(init_items(len(TEXTS), DIM, seed=0), frozen_side)
    params.adapter["head.weight"] = params.adapter["head.weight"] + 0.1  # "trained"
    extended = add_lora(params, lora_side)
    assert extended.names()[:4] == params.names()
    assert len(extended.names()) == 4 + 24 and all(n.startswith("lora.") for n in extended.names()[4:])
    np.testing.assert_array_equal(extended.adapter["head.weight"], params.adapter["head.weight"])
    # LoRA B starts at 0: the adapted encoder equals the base, so the text vectors do not jump
    np.testing.assert_allclose(lora_side.vectors(extended.adapter), frozen_side.vectors(params.adapter), atol=1e-5)
    opt = ServerOptimizer("adam", 0.02)
    opt.step(params.to_arrays(), [np.ones(a.shape) for a in params.to_arrays()])
    extend_optimizer(opt, params, extended)
    assert len(opt.m) == len(extended.names()) and not np.any(opt.m[-1])
    opt.step(extended.to_arrays(), [np.ones(a.shape) for a in extended.to_arrays()])


# ---------------------------------------------------------------- in-process federation

def test_inprocess_hybrid_federation_records_the_adapter_in_the_ledger(block_csv):
    from common.data import load_interactions
    from common.data.splits import split_interactions
    from common.evaluation import EvalSets
    from common.inprocess import run_inprocess

    cfg = hybrid_cfg(**{"data.source": str(block_csv), "fed.rounds": 2, "fed.sample-rate": 0.7,
                        "dp.noise-seed": 1, "dp.target-epsilon": 0.0})
    data = load_interactions(str(block_csv))
    sets = EvalSets.from_split(split_interactions(data, "random", seed=0))
    result = run_inprocess(cfg, sets, texts=[i.text for i in data.items])
    assert isinstance(result.params, HybridParams) and result.text_vectors.shape == (sets.n_items, DIM)
    assert [r["participants"] > 0 for r in result.rounds] == [True, True]
    assert all(e.parameters == result.params.names() for e in result.ledger.events)
    assert len(result.ledger.events) == 2 and result.rounds[-1]["epsilon"] > 0
    final = result.evals[-1]
    assert final["phase"] == "test" and final["users"] > 0 and 0 <= final["ndcg@10"] <= 1


# ---------------------------------------------------------------- new items

def test_new_item_bias_is_predicted_from_text():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((200, 6))
    w = rng.standard_normal(6)
    bias = X @ w + 0.5 + 0.01 * rng.standard_normal(200)
    new = np.array([3, 50, 199])
    predicted, lam = new_item_bias(bias, X, new)
    np.testing.assert_allclose(predicted, (X @ w + 0.5)[new], atol=0.1)
    assert lam in (0.1, 1.0, 10.0, 100.0)


# ---------------------------------------------------------------- the real thing (Ray)

@pytest.mark.slow
def test_tiny_hybrid_federation_with_secagg_and_dp(block_csv, tmp_path):
    from common.privacy import PrivacyLedger
    from common.serialization import load_arrays
    from server import simulation
    from server.report import build_report
    from server.run_dir import RunDir

    cfg = hybrid_cfg(**{"data.source": str(block_csv), "fed.rounds": 2, "fed.sample-rate": 0.8,
                        "fed.eval-every": 1, "fed.eval-clients": 0, "fed.timeout": 300.0,
                        "fed.server-lr": 0.05, "dp.target-epsilon": 0.0})
    assert cfg.secagg.enabled and cfg.dp.enabled
    run_dir = RunDir.create(tmp_path, cfg)
    result = simulation.run(cfg, run_dir, progress=False)
    assert result["num_clients"] == 12
    fits = [r for r in run_dir.rounds() if r["kind"] == "fit"]
    assert [r["round"] for r in fits] == [1, 2]
    assert all(r["participants"] > 0 and r["failures"] == 0 and not r.get("abandoned") for r in fits)
    evals = [r for r in run_dir.rounds() if r["kind"] == "eval"]
    assert evals[-1]["phase"] == "test" and evals[-1]["users"] > 0
    model = load_arrays(run_dir.path / "model.safetensors")
    assert {"item_embeddings", "item_bias", "head.weight", "head.bias"} == set(model)
    assert model["head.weight"].shape == (DIM, 384)
    ledger = PrivacyLedger.from_state_dict(run_dir.load_ledger()["ledger"])
    assert len(ledger.events) == 2
    assert all(e.parameters == ("item_embeddings", "item_bias", "head.weight", "head.bias") for e in ledger.events)
    report = build_report(run_dir.path)
    assert report["parameters"]["released_arrays"] == ["item_embeddings", "item_bias", "head.weight", "head.bias"]
    assert report["parameters"]["secure_aggregation"] is True and report["epsilon"]["rdp"] > 0


@pytest.mark.slow
def test_tiny_lora_federation_releases_the_adapter_under_secagg_and_dp(block_csv, tmp_path):
    from common.privacy import PrivacyLedger
    from common.serialization import load_arrays
    from server import simulation
    from server.run_dir import RunDir

    cfg = hybrid_cfg(**{"data.source": str(block_csv), "fed.rounds": 1, "fed.sample-rate": 0.8,
                        "fed.eval-every": 1, "fed.eval-clients": 0, "fed.timeout": 300.0, "model.lora": True,
                        "dp.target-epsilon": 0.0})
    run_dir = RunDir.create(tmp_path, cfg)
    simulation.run(cfg, run_dir, progress=False)
    fits = [r for r in run_dir.rounds() if r["kind"] == "fit"]
    assert fits and fits[0]["participants"] > 0 and fits[0]["failures"] == 0
    (event,) = PrivacyLedger.from_state_dict(run_dir.load_ledger()["ledger"]).events
    lora = [n for n in event.parameters if n.startswith("lora.")]
    assert event.parameters[:4] == ("item_embeddings", "item_bias", "head.weight", "head.bias")
    # the default LoRA: A and B of the top layer's feed-forward output projection (model.lora-target)
    assert len(lora) == 2 and all(".layer.5.output.dense.lora_" in n for n in lora)
    model = load_arrays(run_dir.path / "model.safetensors")
    assert set(model) == set(event.parameters)
    assert any(np.abs(model[n]).max() > 0 for n in lora if "lora_B" in n)  # B moved off zero (noise and signal)
