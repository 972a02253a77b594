"""Flower's SecAgg+ workflow with a bookkeeping fix for clients that fail before masking, and
the unmasked weight factor kept for the strategy to check.

Flower 1.42's ``SecAggPlusWorkflow`` remembers every *sampled* node and, in the unmask stage,
treats every sampled node that is no longer active as "dropped after masking": it asks the
survivors for that node's key share and later removes its pairwise masks. A node that failed
during key setup or key sharing never distributed shares and is in nobody's masks, so every
survivor raises ``KeyError`` (no such share) and the whole round is lost: one crashing device
could stop every round it is sampled in.

The fix, applied once key sharing is over: only nodes whose shares were distributed can be in
anyone's masks, so they alone are "sampled" for the rest of the protocol, and a dropped node's
neighbours are restricted to them. Nodes that drop later (while training/uploading, or during
unmasking) are handled exactly as before. Nothing about the cryptography changes.

The weight factor: every client prepends its quantized weight (2^bits for weight 1) to its
masked vector, and the workflow divides the unmasked sum by the unmasked total weight. A client
that claims another weight, or a sum that wrapped modulo the modulus, shows up there first, but
the workflow uses it silently. :attr:`last_weight_factor` keeps the value the unmask stage read
(Flower's ``factor_extract`` is wrapped for the duration of the stage), so the strategy can
refuse an aggregate unless it equals n·2^bits (common/secure_sum.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Error, Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as _workflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

log = logging.getLogger(__name__)

#: Error code of a reply the server refused (Flower's codes are small integers; this is ours).
REFUSED_REPLY = 900


class SecAggPlusWorkflowWithEarlyDropouts(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` that survives clients failing in the setup or share-keys stage and
    records the unmasked weight factor of each round (:attr:`last_weight_factor`)."""

    last_weight_factor: int | None = None
    #: Shapes each client's masked upload must have: the weight factor (1,), then the update's
    #: arrays (set by the strategy each round); None: not checked.
    expected_shapes: list[tuple[int, ...]] | None = None
    #: Why the last round's protocol stopped, when a stage raised on a client's reply.
    last_failure: str | None = None
    #: Wall seconds of each stage of the last round (setup, share-keys, collect, unmask).
    stage_seconds: dict[str, float] = {}

    def setup_stage(self, grid, context, state: WorkflowState) -> bool:  # noqa: D102
        self.last_weight_factor, self.last_failure, self.stage_seconds = None, None, {}
        return self._guarded("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid, context, state: WorkflowState) -> bool:  # noqa: D102
        ok = self._guarded("share-keys", super().share_keys_stage, grid, context, state)
        shared = set(state.active_node_ids)  # nodes whose encrypted key shares were forwarded
        state.sampled_node_ids = shared
        state.nid_to_neighbours = {nid: neighbours & shared for nid, neighbours in state.nid_to_neighbours.items()
                                   if nid in shared}
        return ok

    def collect_masked_vectors_stage(self, grid, context, state: WorkflowState) -> bool:  # noqa: D102
        # A masked upload of the wrong shape, type or range would break the sum for everyone:
        # such a reply is turned into that client's failure (a dropout, unmasked by its neighbours).
        screened = _ScreeningGrid(grid, lambda msg: masked_upload_problem(msg, self.expected_shapes, self.modulus_range))
        return self._guarded("collect", super().collect_masked_vectors_stage, screened, context, state)

    def _guarded(self, stage: str, step, grid, context, state: WorkflowState) -> bool:
        """A stage that raises on a client's malformed reply abandons the round instead of ending
        the run (the strategy then releases noise only and charges the round)."""
        t0 = time.perf_counter()
        try:
            return step(grid, context, state)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            self.last_failure = f"{stage} stage: {type(exc).__name__}: {exc}"
            log.error("SecAgg+ %s stage failed on a client's reply (%s): round abandoned", stage, exc)
            return False
        finally:
            self.stage_seconds = {**self.stage_seconds, stage: round(time.perf_counter() - t0, 3)}

    def unmask_stage(self, grid, context, state: WorkflowState) -> bool:  # noqa: D102
        original, combine = _workflow.factor_extract, _workflow.combine_shares

        def recording(parameters):
            factor, rest = original(parameters)
            self.last_weight_factor = int(factor)
            return factor, rest

        def from_threshold(share_list):
            # Any `threshold` shares of a degree-(threshold−1) polynomial give its secret; Flower
            # interpolates through all it received (up to num-shares), which costs ~2.5× as much
            # in pycryptodome's pure-Python GF(2^128) (~0.4 s of a ~90-client round).
            return combine(share_list[:state.threshold])

        _workflow.factor_extract, _workflow.combine_shares = recording, from_threshold
        try:
            return self._guarded("unmask", super().unmask_stage, grid, context, state)
        finally:
            _workflow.factor_extract, _workflow.combine_shares = original, combine


def masked_upload_problem(msg: Message, shapes: list[tuple[int, ...]] | None, modulus: int) -> str | None:
    """Why a client's masked upload (SecAgg+ stage 2 reply) cannot enter the sum, or None."""
    if msg.has_error():
        return None
    try:
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        arrays = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
        recorddict_compat.recorddict_to_fitres(msg.content, keep_input=True)  # the legacy result must parse
    except Exception as exc:  # any malformed field: bytes that are no array, a missing record
        return f"masked upload unreadable ({type(exc).__name__}: {exc})"
    if shapes is not None:
        got = [tuple(a.shape) for a in arrays]
        if got != [tuple(s) for s in shapes]:
            return f"masked upload has shapes {got[:4]}{'...' if len(got) > 4 else ''}, expected {shapes[:4]}..."
    for a in arrays:
        if a.dtype.kind not in "iu":
            return f"masked upload of dtype {a.dtype}, expected integers"
        if a.size and (int(np.min(a)) < 0 or int(np.max(a)) >= modulus):
            return f"masked upload has values outside [0, {modulus})"
    return None


class _ScreeningGrid:
    """A grid whose replies pass ``problem(reply)``: a reply with a problem becomes an error reply
    (its sender counts as failed), so one client's malformed upload never reaches the sum."""

    def __init__(self, grid, problem) -> None:
        self._grid, self._problem = grid, problem

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        by_node = {m.metadata.dst_node_id: m for m in messages}
        out = []
        for reply in self._grid.send_and_receive(messages, timeout=timeout):
            problem = self._problem(reply)
            original = by_node.get(reply.metadata.src_node_id)
            if problem and original is not None:
                log.warning("node %s: %s", reply.metadata.src_node_id, problem)
                failure = getattr(self._grid, "report_failure", None)
                if failure is not None:
                    failure(reply.metadata.src_node_id, f"SecAgg+ upload refused: {problem}")
                reply = Message(Error(REFUSED_REPLY, problem), reply_to=original)
            out.append(reply)
        return out
