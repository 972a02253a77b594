"""Each round's payload bytes (server/grid.py ``payload_bytes``), counted on real Flower messages."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from server.grid import payload_bytes

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_payload_counts_array_bytes_and_record_values():
    arrays = ArrayRecord([np.zeros((100, 8), dtype=np.float32), np.zeros(100, dtype=np.float64)])
    configs = ConfigRecord({"masked": [b"\x00" * 1000, b"\x01" * 24], "stage": "collect", "round": 3})
    metrics = MetricRecord({"loss": 0.5})
    msg = Message(RecordDict({"a": arrays, "c": configs, "m": metrics}), dst_node_id=1, message_type="train")
    data = sum(len(a.data) for a in arrays.values())
    assert data >= 100 * 8 * 4 + 100 * 8  # the arrays' bytes (with their small headers)
    assert payload_bytes(msg) == data + 1024 + len("collect") + 8 + 8


def test_an_error_reply_carries_nothing():
    ins = Message(RecordDict({"a": ArrayRecord([np.zeros(10)])}), dst_node_id=1, message_type="train")
    ins.metadata.__dict__["_message_id"] = "x"
    reply = Message(Error(code=1, reason="boom"), reply_to=ins)
    assert payload_bytes(reply) == 0


def test_array_bytes_grow_with_the_model():
    small = Message(RecordDict({"a": ArrayRecord({"x": Array(np.zeros(10, np.float32))})}), dst_node_id=1,
                    message_type="train")
    big = Message(RecordDict({"a": ArrayRecord({"x": Array(np.zeros(10_010, np.float32))})}), dst_node_id=1,
                  message_type="train")
    assert payload_bytes(big) - payload_bytes(small) == 40_000
