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

from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as _workflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState


class SecAggPlusWorkflowWithEarlyDropouts(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` that survives clients failing in the setup or share-keys stage and
    records the unmasked weight factor of each round (:attr:`last_weight_factor`)."""

    last_weight_factor: int | None = None

    def setup_stage(self, grid, context, state: WorkflowState) -> bool:  # noqa: D102
        self.last_weight_factor = None
        return super().setup_stage(grid, context, state)

    def unmask_stage(self, grid, context, state: WorkflowState) -> bool:  # noqa: D102
        original = _workflow.factor_extract

        def recording(parameters):
            factor, rest = original(parameters)
            self.last_weight_factor = int(factor)
            return factor, rest

        _workflow.factor_extract = recording
        try:
            return super().unmask_stage(grid, context, state)
        finally:
            _workflow.factor_extract = original

    def share_keys_stage(self, grid, context, state: WorkflowState) -> bool:  # noqa: D102
        ok = super().share_keys_stage(grid, context, state)
        shared = set(state.active_node_ids)  # nodes whose encrypted key shares were forwarded
        state.sampled_node_ids = shared
        state.nid_to_neighbours = {nid: neighbours & shared for nid, neighbours in state.nid_to_neighbours.items()
                                   if nid in shared}
        return ok
