"""Flower's simulation engine hands out messages in one pass over the stored messages instead
of one pass per node (issue 17: the default job and 100,000 clients).

Flower 1.42's ``vce_api.add_messages_to_queue`` runs in the simulation's driver, every 0.1 s:
for every one of the N registered nodes it calls ``InMemoryLinkState.get_message_ins(node, 1)``,
which takes the state's lock and walks all M stored messages. That is N·M work ten times a
second, with no message waiting too (N calls): measured in a py-spy profile of the default job
(943 nodes, ~100 messages per SecAgg+ stage), the thread held the GIL for about half of the
driver's samples, time the server's workflow and the Ray workers on this 2-core machine then do
not get; at 100,000 nodes one sweep alone takes longer than its 0.1 s period.

:func:`pending_messages` gives what those N calls give -- for every node of the run, its first
undelivered message in the store's order, each checked by the store's own
``_check_stored_messages`` (expiry, federation) and marked delivered -- in one pass over the M
messages under the same lock. :func:`install` puts it in place of Flower's loop for this
process, only when Flower is the version it was written against (1.42) and its in-memory state
has the attributes it reads; otherwise Flower's own loop runs unchanged. The replacement is
checked against Flower's own ``get_message_ins`` on a real state in
``tests/test_vce_polling.py``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from queue import Queue
from typing import Any

log = logging.getLogger(__name__)

SUPPORTED = ("1.42.",)  # Flower versions whose vce_api / InMemoryLinkState this was checked against
_installed: dict[str, Any] = {}


def pending_messages(state: Any, nodes: Mapping[int, Any] | set[int]) -> list[Any]:
    """For every node in ``nodes``, its first message not yet delivered (store order), marked
    delivered now -- what ``state.get_message_ins(node_id=n, limit=1)`` returns for each node n,
    in one pass over the store."""
    from flwr.supercore.date import now

    found: dict[int, Any] = {}
    with state.lock:
        ids = list(state.message_ins_store.keys())
        if not ids:
            return []
        state._check_stored_messages(set(ids))  # expired or out-of-federation messages are removed
        for msg_id in ids:
            msg = state.message_ins_store.get(msg_id)
            if msg is None:
                continue
            meta = msg.metadata
            node = meta.dst_node_id
            if node in nodes and node not in found and meta.delivered_at == "":
                found[node] = msg
        delivered_at = now().isoformat()
        for msg in found.values():
            msg.metadata.delivered_at = delivered_at
    return list(found.values())


def _usable(state: Any) -> bool:
    return all(hasattr(state, name) for name in ("lock", "message_ins_store", "_check_stored_messages"))


#: Seconds between two passes. Flower waits 0.1 s, which a cohort's message waits for ~0.05 s on
#: average at each of a SecAgg+ round's four stages; one pass over the store costs well under a
#: millisecond for a cohort's ~100 messages, so passes can be 5× as frequent.
PERIOD = 0.02


def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: Mapping[int, Any],
                          f_stop: threading.Event) -> None:
    """Flower's loop (same signature), one pass per :data:`PERIOD`."""
    if not _usable(state):
        log.warning("Flower's link state is not the in-memory one this was written for: using Flower's own loop")
        return _installed["original"](state, queue, nodes_mapping, f_stop)
    nodes = set(nodes_mapping)
    while not f_stop.is_set():
        for msg in pending_messages(state, nodes):
            queue.put(msg)
        f_stop.wait(PERIOD)


def install() -> bool:
    """Use :func:`add_messages_to_queue` in this process's Flower simulation engine. Returns
    whether it is in place (False, and Flower's own loop, for a Flower version not in
    :data:`SUPPORTED` or with ``FEDREC_VCE_POLLING=flower``)."""
    import os

    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    if os.environ.get("FEDREC_VCE_POLLING", "fedrec") == "flower":  # Flower's own loop, to compare (benchmarks)
        return False
    if not flwr.__version__.startswith(SUPPORTED):
        log.info("flwr %s: keeping Flower's own message polling (checked for %s)", flwr.__version__, SUPPORTED)
        return False
    if vce_api.add_messages_to_queue is not add_messages_to_queue:
        _installed["original"] = vce_api.add_messages_to_queue
        vce_api.add_messages_to_queue = add_messages_to_queue
    return True


def uninstall() -> None:
    """Flower's own loop again (tests)."""
    from flwr.server.superlink.fleet.vce import vce_api

    if "original" in _installed:
        vce_api.add_messages_to_queue = _installed.pop("original")
