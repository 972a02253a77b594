"""Flower's SecAgg+ workflow with one bookkeeping fix for clients that fail before masking.

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
"""

from __future__ import annotations

from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState


class SecAggPlusWorkflowWithEarlyDropouts(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` that survives clients failing in the setup or share-keys stage."""

    def share_keys_stage(self, grid, context, state: WorkflowState) -> bool:  # noqa: D102
        ok = super().share_keys_stage(grid, context, state)
        shared = set(state.active_node_ids)  # nodes whose encrypted key shares were forwarded
        state.sampled_node_ids = shared
        state.nid_to_neighbours = {nid: neighbours & shared for nid, neighbours in state.nid_to_neighbours.items()
                                   if nid in shared}
        return ok
