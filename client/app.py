"""Flower ClientApp: a thin shell around :mod:`common.federated`.

What leaves the device each round: the dense item-side update (same shape for every client),
a mean training loss and the number of users trained (1 on a device). The user vector stays
in ``context.state``. Evaluation returns sums of per-user ranking metrics and a user count.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from common import keys
from common.config import RunConfig
from common.federated import ClientData, client_evaluate, client_train
from common.mf import ItemParams
from common.federated import validate_update
from common.privacy.dp_fedavg import clip_item_update
from client.data import simulated_client_data

log = logging.getLogger(__name__)


class RecClient(NumPyClient):
    def __init__(self, cfg: RunConfig, data: ClientData, context: Context) -> None:
        self.cfg, self.data, self.state = cfg, data, context.state

    def get_properties(self, config):  # noqa: D102 - a pseudonymous id for sampling
        return {keys.PROP_CLIENT_ID: int(self.data.client_id)}

    def fit(self, parameters, config):
        params = ItemParams.from_arrays(parameters)
        update, loss, vectors = client_train(
            params, self.data, model=self.cfg.model,
            epochs=int(config.get(keys.LOCAL_EPOCHS, self.cfg.fed.local_epochs)),
            lr=float(config.get(keys.CLIENT_LR, self.cfg.fed.client_lr)),
            seed=self.cfg.seed, server_round=int(config[keys.SERVER_ROUND]))
        self.state.array_records[keys.STATE_USER_VECTORS] = ArrayRecord([np.stack(vectors)])
        arrays = update.to_arrays()
        if keys.CLIP_NORM in config:  # DP and SecAgg+: bound this user's influence before anything leaves
            arrays = clip_item_update(arrays, float(config[keys.CLIP_NORM]), float(config.get(keys.BIAS_SHARE, 0.0)))
        problem = validate_update(arrays, [np.shape(p) for p in parameters], float(config.get(keys.CLIP_NORM, np.inf)))
        if problem:  # refuse before masking: under SecAgg+ a NaN would silently corrupt the sum
            raise ValueError(f"client {self.data.client_id}: update refused: {problem}")
        # num_examples = 1: every client weighs the same (user-level DP, SecAgg+ max_weight=1).
        return arrays, 1, {keys.M_TRAIN_LOSS: loss, keys.M_USERS: len(vectors)}

    def evaluate(self, parameters, config):
        params = ItemParams.from_arrays(parameters)
        metrics = client_evaluate(params, self.data, model=self.cfg.model,
                                  phase=str(config.get(keys.PHASE, "test")), seed=self.cfg.seed)
        users = int(metrics.pop("users"))
        return 0.0, users, {k: float(v) for k, v in metrics.items()}


def client_fn_for(cfg: RunConfig | None):
    """A ``client_fn``; ``cfg=None`` reads the run config from the context (``flwr run``)."""

    def client_fn(context: Context):
        torch.set_num_threads(1)
        run_cfg = cfg or RunConfig.from_flat(dict(context.run_config))
        pid = int(context.node_config[keys.NODE_PARTITION_ID])
        data = simulated_client_data(run_cfg.data, pid, kind=run_cfg.fed.partition,
                                     num_silos=run_cfg.fed.num_silos, seed=run_cfg.seed)
        return RecClient(run_cfg, data, context).to_client()

    return client_fn


def secagg_when_requested(msg, context, call_next):
    """Run Flower's ``secaggplus_mod`` on training messages that carry the SecAgg+ protocol, and
    pass everything else through: one ClientApp serves runs with and without SecAgg+."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def build_client_app(cfg: RunConfig | None = None, mods: list | None = None) -> ClientApp:
    # Extra mods (tests: failure injection) run outside SecAgg+, like a device failing.
    return ClientApp(client_fn=client_fn_for(cfg), mods=[*(mods or []), secagg_when_requested])


app = build_client_app()
