"""A Grid wrapper that bounds every wait and names failed clients: the one hook the default
workflows need (they call ``send_and_receive`` without a timeout)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

NODE_IDS_TTL = 10.0  # seconds a simulation's node set is reused (BoundedGrid.get_node_ids)


class BoundedGrid:
    """Delegates to ``grid``; ``send_and_receive`` gets ``timeout``, sends large fan-outs in
    chunks, and reports each error reply and each missing reply to ``on_failure(node_id, reason)``.

    Chunking: with Flower 1.42's own hand-out loop every pending message is scanned for every
    node on each poll, so one fan-out to all N clients costs O(N²); chunks of ``chunk`` messages
    keep that bounded (the same replies, in the same order of chunks). The simulation replaces
    that loop with one pass (server/vce_polling.py); deployments keep the chunks too.
    """

    def __init__(self, grid: Grid, timeout: float, on_failure: Callable[[int, str], None], chunk: int = 200,
                 stable_nodes: int | None = None) -> None:
        self._grid, self._timeout, self._on_failure, self._chunk = grid, timeout, on_failure, chunk
        self._stable_nodes = stable_nodes
        self._node_ids: set[int] | None = None
        self._node_ids_at = 0.0
        if isinstance(getattr(grid, "pull_interval", None), float):
            # The simulation's in-memory grid sleeps 0.1 s between polls for replies: ~0.05 s lost
            # at the end of every fan-out (four per SecAgg+ round); a poll of a cohort's replies is cheap.
            grid.pull_interval = min(grid.pull_interval, 0.02)
        self._traffic = {"bytes_down": 0, "bytes_up": 0}

    def take_traffic(self) -> dict[str, int]:
        """Payload bytes sent to and received from clients since the last call (then reset)."""
        out, self._traffic = self._traffic, {"bytes_down": 0, "bytes_up": 0}
        return out

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def get_node_ids(self):
        """The connected nodes. In a simulation of ``stable_nodes`` clients (registered once, never
        leaving) the set is kept for :data:`NODE_IDS_TTL` s once all have registered: Flower's
        in-memory state walks every node for it (~0.2-0.35 s at 100,000, holding the lock the
        engine's hand-out needs), and the legacy client manager asks for it on every ``all()``,
        ``num_available()`` and every 5 s. Otherwise (deployment) every call asks the grid."""
        if self._node_ids is not None and time.monotonic() - self._node_ids_at < NODE_IDS_TTL:
            return self._node_ids
        ids = set(self._grid.get_node_ids())
        if self._stable_nodes is not None and len(ids) >= self._stable_nodes:
            self._node_ids, self._node_ids_at = ids, time.monotonic()
        return ids

    def report_failure(self, node_id: int, reason: str) -> None:
        """Count a node's reply the server refused as that node's failure."""
        self._on_failure(node_id, reason)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._traffic["bytes_down"] += sum(payload_bytes(m) for m in messages)
        replies: list[Message] = []
        for start in range(0, len(messages), self._chunk):  # each chunk gets the full timeout
            replies.extend(self._grid.send_and_receive(messages[start:start + self._chunk],
                                                       timeout=timeout or self._timeout))
        self._traffic["bytes_up"] += sum(payload_bytes(m) for m in replies)
        answered = set()
        for msg in replies:
            answered.add(msg.metadata.src_node_id)
            if msg.has_error():
                self._on_failure(msg.metadata.src_node_id, _reason(msg.error.reason))
        for msg in messages:
            if msg.metadata.dst_node_id not in answered:
                self._on_failure(msg.metadata.dst_node_id, f"no reply within {timeout or self._timeout:.0f} s")
        return replies


def payload_bytes(msg: Message) -> int:
    """What a message carries: the bytes of its arrays, and of the values in its config and
    metric records (bytes and strings by length, numbers 8 bytes each). Flower's framing and
    metadata are not counted; an error reply counts 0."""
    if msg.has_error():
        return 0
    content = msg.content
    total = sum(len(arr.data) for rec in content.array_records.values() for arr in rec.values())
    for rec in (*content.config_records.values(), *content.metric_records.values()):
        for value in rec.values():
            total += _value_bytes(value)
    return total


def _value_bytes(value) -> int:
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8


def _reason(text: str | None) -> str:
    """The client's own message out of Flower's error text ("...Message: <ours>'>")."""
    if not text:
        return "error without a reason"
    line = text.strip().splitlines()[-1]
    if "Message: " in line:
        line = line.split("Message: ", 1)[1]
    return line.rstrip("'>").strip()
