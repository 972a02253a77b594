"""Malicious clients in a real Flower simulation (issue #12, findings 2 and 4): every reply is
parsed defensively; a bad reply counts as one failure of that client and the round goes on.

Each misbehaviour below ended the whole run on the old code (an exception in the ServerApp) or
was silently accepted (a copied identity displaced its owner; a lying evaluation moved the
reported NDCG@10)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from common.config import RunConfig
from server import simulation
from server.run_dir import RunDir
from tests.conftest import write_block_csv

pytestmark = pytest.mark.slow

NO_ID, BAD_ID, COPIED_ID, BAD_LOSS, BAD_UPLOAD, LYING_EVAL = 1, 2, 3, 4, 5, 6


def _stage(msg: Message) -> str | None:
    rec = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    return None if rec is None else rec.get(Key.STAGE)


def malicious(msg: Message, context: Context, call_next):
    """Honest computation, then the reply is tampered with, per partition id."""
    pid = int(context.node_config["partition-id"])
    stage = _stage(msg)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    records = reply.content.config_records
    if msg.metadata.message_type == "get_properties":
        props = records["getpropertiesres.properties"]
        if pid == NO_ID:
            del props["client-id"]
        elif pid == BAD_ID:
            props["client-id"] = "abc"
        elif pid == COPIED_ID:
            props["client-id"] = 0  # partition 0's pseudonymous id
    elif msg.metadata.message_type == "train" and pid == BAD_LOSS and "fitres.metrics" in records:
        records["fitres.metrics"]["train-loss"] = "lots"
        records["fitres.metrics"]["silo-sigma"] = "x"
    elif msg.metadata.message_type == "train" and pid == BAD_UPLOAD and stage == Stage.COLLECT_MASKED_VECTORS:
        masked = list(records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])
        masked[-1] = ndarray_to_bytes(np.zeros(3, dtype=np.int64))  # the bias vector with the wrong shape
        records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = masked
    elif msg.metadata.message_type == "evaluate" and pid == LYING_EVAL:
        records["evaluateres.metrics"]["ndcg@10"] = 90909091.0
    return reply


@pytest.mark.parametrize("secagg", [True, False])
def test_malicious_replies_cost_only_their_senders(tmp_path, monkeypatch, caplog, secagg):
    from client import app as client_app

    csv = write_block_csv(tmp_path / "r.csv", n_users=12)
    cfg = RunConfig.from_flat({"data.source": str(csv), "fed.rounds": 2, "fed.sample-rate": 1.0, "fed.eval-every": 10,
                               "fed.eval-clients": 0, "fed.timeout": 300.0, "model.dim": 4, "dp.noise-seed": 0,
                               "dp.target-epsilon": 0, "secagg.enabled": secagg})
    original = client_app.build_client_app
    monkeypatch.setattr(client_app, "build_client_app", lambda c: original(c, mods=[malicious]))
    run_dir = RunDir.create(tmp_path / "runs", cfg)
    with caplog.at_level("WARNING", logger="server.strategy"):
        simulation.run(cfg, run_dir, progress=False)
    fits = [r for r in run_dir.rounds() if r["kind"] == "fit"]
    test = [r for r in run_dir.rounds() if r["kind"] == "eval"][-1]
    # three nodes without a usable identity are never sampled; the bad upload is refused (SecAgg+)
    sampled = 12 - 3
    participants = sampled - (1 if secagg else 0)
    assert [r["sampled"] for r in fits] == [sampled, sampled]
    assert [r["participants"] for r in fits] == [participants, participants]
    assert not any(r.get("abandoned") for r in fits)
    assert test["users"] == sampled - 1  # the lying evaluation is refused, the others count
    assert 0 <= test["ndcg@10"] <= 1
    log = caplog.text
    assert "identity reply refused" in log and "client-id must be an integer, got 'abc'" in log
    assert "belongs to another connected node" in log
    assert "evaluation refused: ndcg@10 sum 90909091.0" in log
    assert "client 6 failed" in log  # failures are named by the client's pseudonymous id
    if secagg:
        assert "client 5 failed: SecAgg+ upload refused" in log
    assert (run_dir.path / "model.safetensors").is_file()
