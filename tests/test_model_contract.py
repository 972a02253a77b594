"""One contract, every model (issue #13): the same checks run against MF and the hybrid (implicit's
contract mixin is the example), and nothing outside common/models/ asks which kind it has."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from common import keys
from common.config import RunConfig
from common.models import ClientData, ItemParams, UserData, build_model
from common.privacy.dp_fedavg import global_norm
from common.rounds import RoundEngine
from tests.conftest import ITEM_TEXTS

ROOT = Path(__file__).resolve().parents[1]
DIM = 6
torch.set_num_threads(1)


@pytest.fixture(params=["mf", "hybrid"])
def model(request, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path_factory.getbasetemp() / "fedrec-cache"))
    cfg = RunConfig.from_flat({"model.kind": request.param, "model.dim": DIM, "model.text-negatives": 4})
    return build_model(cfg.model, n_items=len(ITEM_TEXTS), seed=0, texts=lambda: ITEM_TEXTS)


def client(cid: int = 0) -> ClientData:
    items = np.array([0, 1, 2, 5], dtype=np.int64)
    return ClientData(cid, (cid,), (UserData(items, np.ones(len(items), np.float32)),),
                      (np.array([3], np.int64),), (np.array([4], np.int64),))


def test_parameters_travel_and_come_back_unchanged(model):
    params = model.init(seed=0)
    names, arrays = model.names(params), model.arrays(params)
    assert len(names) == len(arrays) and names[:2] == keys.ITEM_PARAM_NAMES
    again = model.with_arrays(params, [a.copy() for a in arrays])
    assert all(np.array_equal(a, b) for a, b in zip(model.arrays(again), arrays))
    named = model.named(params)
    assert list(named) == list(names)
    assert all(np.array_equal(a, b) for a, b in zip(model.arrays(model.from_named(named)), arrays))
    context = model.context(params)
    assert len(context) == len(model.context_names)
    instruction = {keys.TRAINABLE_ARRAYS: len(arrays)} if context else {}
    received, got_context = model.receive([*arrays, *context], instruction)
    assert all(np.array_equal(a, b) for a, b in zip(model.arrays(received), arrays))
    assert all(np.array_equal(a, b) for a, b in zip(got_context, context))
    with pytest.raises(ValueError):
        model.receive(arrays[:1], instruction)
    assert model.metadata(params)["format"].startswith("fedrec-")


def test_the_effective_view_scores_every_item(model):
    params = model.init(seed=0)
    effective = model.effective(params, model.context(params))
    assert isinstance(effective, ItemParams)
    assert effective.embeddings.shape == (len(ITEM_TEXTS), DIM) and effective.bias.shape == (len(ITEM_TEXTS),)


@pytest.mark.parametrize("share", [0.0, 0.05])
def test_clipping_bounds_the_joint_norm_and_the_bias_group(model, share):
    params = model.init(seed=0)
    big = [np.full(a.shape, 3.0, dtype=np.float32) for a in model.arrays(params)]
    clipped = model.clip(big, 0.5, share)
    assert [a.shape for a in clipped] == [a.shape for a in big]
    assert global_norm(clipped) <= 0.5 * (1 + 1e-6)
    if share:
        assert np.linalg.norm(clipped[1]) <= 0.5 * np.sqrt(share) * (1 + 1e-6)


def test_a_device_step_updates_every_trainable_array(model):
    params = model.init(seed=0)
    step = model.train(params, model.context(params), client(), epochs=1, lr=1.0, seed=0, server_round=1)
    assert [u.shape for u in step.update] == [a.shape for a in model.arrays(params)]
    assert all(np.all(np.isfinite(u)) for u in step.update) and np.isfinite(step.loss)
    assert len(step.user_vectors) == 1 and step.user_vectors[0].shape == (DIM,)
    with pytest.raises(ValueError):  # a client with nothing to train on
        empty = ClientData(1, (1,), (UserData(np.zeros(0, np.int64), np.zeros(0, np.float32)),), (), ())
        model.train(params, model.context(params), empty, epochs=1, lr=1.0, seed=0, server_round=1)


def test_the_round_engine_releases_any_model(model):
    cfg = RunConfig.from_flat({"model.kind": model.kind, "model.dim": DIM, "dp.noise-seed": 0,
                               "dp.target-epsilon": 0})
    engine = RoundEngine(cfg, model)
    before = [a.copy() for a in model.arrays(engine.params)]
    instruction = engine.instruction(1, secure_aggregation=False)
    assert instruction[keys.CLIP_NORM] == cfg.dp.clip and (keys.TRAINABLE_ARRAYS in instruction) == bool(
        model.context_names)
    step = model.train(engine.params, engine.context, client(), epochs=1, lr=1.0, seed=0, server_round=1)
    update = model.clip(step.update, cfg.dp.clip, cfg.dp.bias_share)
    assert engine.check(update, secure_aggregation=False) is None
    engine.release(update, 1, 1, population=10)
    assert engine.ledger.events[0].parameters == model.names(engine.params)
    assert all(not np.array_equal(a, b) for a, b in zip(model.arrays(engine.params), before))
    assert len(engine.outgoing()) == len(before) + len(model.context_names)


# Patterns that mean "which model is this?": a kind compared, a model's own array name looked for,
# a parameter type probed.
KIND_BRANCH = re.compile(r"""(\.kind\s*[!=]=|ModelKind\.(MF|HYBRID)|["']head\.(weight|bias)["']|named_arrays|"""
                         r"""hasattr\(\s*params|isinstance\([^)]*(HybridParams|ItemParams)|text_side)""")


def test_the_server_steps_each_array_at_the_models_scale(model, tmp_path_factory, monkeypatch):
    """FedAdam's first step moves every coordinate by lr · scale · sign(update): the hybrid's
    text side at ``model.text-step-scale`` of the free part's rate, MF's arrays all at 1."""
    from common.rounds import ServerOptimizer

    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path_factory.getbasetemp() / "fedrec-cache"))
    cfg = RunConfig.from_flat({"model.kind": model.kind, "model.dim": DIM, "model.text-step-scale": 0.1})
    scaled = build_model(cfg.model, n_items=len(ITEM_TEXTS), seed=0, texts=lambda: ITEM_TEXTS)
    params = scaled.init(0)
    arrays = scaled.arrays(params)
    scales = scaled.server_lr_scales(params)
    assert len(scales) == len(arrays)
    assert scales == [1.0, 1.0] + [0.1] * (len(arrays) - 2)  # MF has no text side: [1, 1]
    opt = ServerOptimizer("adam", 0.02)
    new = opt.step(arrays, [np.ones_like(a) for a in arrays], scales)
    for a, b, k in zip(arrays, new, scales):
        np.testing.assert_allclose(b - a, 0.02 * k, rtol=1e-3, atol=1e-7)
    with pytest.raises(ValueError, match="2 learning-rate scales for"):
        ServerOptimizer("adam", 0.02).step(arrays + [np.zeros(1)], [np.zeros(1)] * (len(arrays) + 1), [1.0, 1.0])


def test_no_code_outside_the_model_packages_asks_which_model_it_has():
    offenders = []
    for path in sorted([*ROOT.glob("common/**/*.py"), *ROOT.glob("server/**/*.py"), *ROOT.glob("client/**/*.py"),
                        ROOT / "simulate.py"]):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("common/models/") or rel in ("common/choices.py", "common/config.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if KIND_BRANCH.search(code) and "dtype.kind" not in code:
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
