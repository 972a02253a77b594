"""Flower ClientApp: a thin shell around :mod:`common.federated`.

What leaves the device each round: the dense item-side update (same shape for every client),
protected by the device's own privacy floor (:mod:`common.privacy.device`: its clip bound, and
under local DP its own noise), the number of users trained (1 on a device) and, only where the
server sees the update in plaintext anyway, the mean training loss. The user vector stays in
``context.state``. Evaluation returns sums of per-user ranking metrics and a user count.

On a real device (node_config ``data-path``) the data are the user's own, in a
:class:`client.store.DeviceStore`; the received global model and the user vector are kept there.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from common import keys
from common.config import RunConfig
from common.federated import ClientData, client_evaluate, client_train, validate_update
from common.mf import ItemParams
from common.privacy.device import DevicePolicy, PolicyRefusal, Protection, protection_for
from common.privacy.dp_fedavg import add_local_noise, clip_item_update, ledger_for, local_bound, local_noise_for, release_event
from common.silo_dp import checked_history, dp_sgd_item_update
from client.data import check_received_model, device_client_data, keep_on_device, simulated_client_data

log = logging.getLogger(__name__)

FIT_METRICS_RECORD = "fitres.metrics"  # where Flower's legacy FitRes keeps a client's metrics


class RecClient(NumPyClient):
    """One simulated device (or silo). ``policy`` is its owner's privacy floor: every update it
    sends is protected by it, whatever the server's instruction says (common/privacy/device.py)."""

    def __init__(self, cfg: RunConfig, data: ClientData, context: Context, policy: DevicePolicy | None = None) -> None:
        self.cfg, self.data, self.state = cfg, data, context.state
        self.policy = policy or DevicePolicy.for_run(cfg)  # a simulated device: the operator's floor

    def get_properties(self, config):  # noqa: D102 - a pseudonymous id for sampling, and how many users
        return {keys.PROP_CLIENT_ID: int(self.data.client_id), keys.PROP_USERS: len(self.data.users)}

    def fit(self, parameters, config):
        protection = protection_for(self.policy, config)  # PolicyRefusal: nothing is sent
        if self.cfg.model.kind == "hybrid":
            return self._fit_hybrid(parameters, config, protection)
        params = ItemParams.from_arrays(parameters)
        if self.cfg.dp.silo_dp_sgd and self.cfg.fed.partition == "silo":
            return self._fit_dp_sgd(params, parameters, config, protection)
        update, loss, vectors = client_train(
            params, self.data, model=self.cfg.model,
            epochs=int(config.get(keys.LOCAL_EPOCHS, self.cfg.fed.local_epochs)),
            lr=float(config.get(keys.CLIENT_LR, self.cfg.fed.client_lr)),
            seed=self.cfg.seed, server_round=int(config[keys.SERVER_ROUND]))
        self.state.array_records[keys.STATE_USER_VECTORS] = ArrayRecord([np.stack(vectors)])
        arrays = self._protect(update.to_arrays(), parameters, protection, int(config[keys.SERVER_ROUND]))
        # num_examples = 1: every client weighs the same (user-level DP, SecAgg+ max_weight=1).
        return arrays, 1, self._metrics({keys.M_TRAIN_LOSS: loss, keys.M_USERS: len(vectors)}, protection)

    @staticmethod
    def _metrics(metrics: dict, protection: Protection) -> dict:
        """Plaintext metrics that go with the update. Under local DP the server is not trusted, and
        an un-noised training loss would leak about the user's data: it stays on the device (under
        SecAgg+ too: :func:`secagg_when_requested` drops it)."""
        if protection.local_noise is not None:
            return {k: v for k, v in metrics.items() if k not in (keys.M_TRAIN_LOSS, keys.M_TEXT_LOSS)}
        return metrics

    def _protect(self, arrays: list[np.ndarray], parameters, protection: Protection, rnd: int,
                 clip=clip_item_update, names: tuple[str, ...] = keys.ITEM_PARAM_NAMES) -> list[np.ndarray]:
        """Clip to the device's bound (its own, or the server's if tighter), add the device's own
        noise when asked to or when its policy requires it, and refuse a bad update before
        masking: under SecAgg+ a NaN would silently corrupt the sum."""
        bound = protection.clip
        if np.isfinite(bound):
            arrays = clip(arrays, bound, protection.bias_share)
        if protection.local_noise is not None:
            arrays = self._local_dp(arrays, protection.local_noise, bound, rnd, names)
            bound = local_bound(protection.local_noise, bound)
        problem = validate_update(arrays, [np.shape(p) for p in parameters[:len(arrays)]], bound)
        if problem:
            raise ValueError(f"client {self.data.client_id}: update refused: {problem}")
        return arrays

    def _local_dp(self, arrays: list[np.ndarray], sigma: float, clip: float, rnd: int,
                  names: tuple[str, ...]) -> list[np.ndarray]:
        """Local DP: noise added here, on the device, from its own source (secure unless the
        device's owner seeded it), recorded in the device's own ledger."""
        noise = local_noise_for(self.policy.noise_seed, rnd, self.data.client_id)
        arrays = add_local_noise(arrays, noise_multiplier=sigma, clip=clip, noise=noise)
        ledger = ledger_for("local", self.cfg.dp.delta)
        saved = self._saved_local_ledger()
        if saved:
            ledger.load_state_dict(saved)
        # A ledger kept across runs (a device's store) sees rounds start again: number on.
        last = ledger.events[-1].round if ledger.events else 0
        ledger.record(release_event("local", noise_multiplier=sigma, sample_rate=1.0, parameters=names,
                                    server_round=rnd if rnd > last else last + 1))
        self._keep_local_ledger(ledger.state_dict())
        return arrays

    def _saved_local_ledger(self) -> dict | None:
        saved = self.state.config_records.get(keys.STATE_LOCAL_LEDGER)
        return json.loads(str(saved["json"])) if saved else None

    def _keep_local_ledger(self, state: dict) -> None:
        self.state.config_records[keys.STATE_LOCAL_LEDGER] = ConfigRecord({"json": json.dumps(state)})

    def _fit_dp_sgd(self, params: ItemParams, parameters, config, protection: Protection):
        """A silo: Opacus DP-SGD with one user as the unit, ε composed across rounds from the
        accountant history kept in this node's state (never restarted); this round's history
        entry goes to the server, which keeps every silo's history with its checkpoint."""
        dp = self.cfg.dp
        rnd = int(config[keys.SERVER_ROUND])
        saved = self.state.config_records.get(keys.STATE_DPSGD_HISTORY)
        history = checked_history(json.loads(str(saved["json"]))) if saved else []
        result = dp_sgd_item_update(
            params, list(self.data.trainable), user_reg=self.cfg.model.user_reg,
            noise_multiplier=dp.silo_noise_multiplier, max_grad_norm=dp.silo_clip,
            sample_rate=dp.silo_sample_rate, epochs=int(config.get(keys.LOCAL_EPOCHS, self.cfg.fed.local_epochs)),
            lr=float(config.get(keys.CLIENT_LR, self.cfg.fed.client_lr)),
            seed=int(np.random.default_rng([self.cfg.seed, rnd, self.data.client_id]).integers(2**31)),
            history=history, delta=dp.silo_delta, server_round=rnd,
            noise_source="urandom" if self.policy.noise_seed is None else "seeded")
        self.state.config_records[keys.STATE_DPSGD_HISTORY] = ConfigRecord({"json": json.dumps(result.history)})
        arrays = self._protect(result.update.to_arrays(), parameters, protection, rnd)
        sigma, rate, steps = result.history[-1]
        return arrays, 1, self._metrics({keys.M_TRAIN_LOSS: result.mean_loss, keys.M_USERS: len(self.data.trainable),
                                         keys.M_SILO_SIGMA: sigma, keys.M_SILO_RATE: rate, keys.M_SILO_STEPS: steps},
                                        protection)

    def _fit_hybrid(self, parameters, config, protection: Protection):
        """``model.kind = hybrid``: the trainable arrays (free item part, biases, head, LoRA) are
        followed by the item text vectors, a context array the server computed: no update is sent
        for it. Clipped per group and validated like the MF update (common/hybrid_federated.py)."""
        from common.hybrid_federated import client_side, clip_hybrid_update, hybrid_client_train, split_arrays

        side = client_side(self.cfg)
        n = int(config.get(keys.TRAINABLE_ARRAYS, len(parameters) - 1))
        params, text_vectors = split_arrays(parameters, n, side.adapter_names)
        arrays, loss, vectors, text_loss = hybrid_client_train(
            params, text_vectors, self.data, side, model=self.cfg.model,
            epochs=int(config.get(keys.LOCAL_EPOCHS, self.cfg.fed.local_epochs)),
            lr=float(config.get(keys.CLIENT_LR, self.cfg.fed.client_lr)),
            seed=self.cfg.seed, server_round=int(config[keys.SERVER_ROUND]))
        self.state.array_records[keys.STATE_USER_VECTORS] = ArrayRecord([np.stack(vectors)])
        arrays = self._protect(arrays, parameters[:n], protection, int(config[keys.SERVER_ROUND]),
                               clip=clip_hybrid_update, names=params.names())
        return arrays, 1, self._metrics({keys.M_TRAIN_LOSS: loss, keys.M_USERS: len(vectors),
                                         keys.M_TEXT_LOSS: text_loss}, protection)

    def evaluate(self, parameters, config):
        if self.cfg.model.kind == "hybrid":  # item vectors = free part + the server's text vectors
            from common.hybrid_federated import effective_from_arrays

            parameters = effective_from_arrays(parameters).to_arrays()
        params = ItemParams.from_arrays(parameters)
        metrics = client_evaluate(params, self.data, model=self.cfg.model,
                                  phase=str(config.get(keys.PHASE, "test")), seed=self.cfg.seed)
        users = int(metrics.pop("users"))
        return 0.0, users, {k: float(v) for k, v in metrics.items()}


class DeviceRecClient(RecClient):
    """A real device (node_config ``data-path``): trains on its DeviceStore and keeps there the
    global model it receives and its new user vector, so ``fedrec-client recommend`` works offline."""

    def __init__(self, cfg: RunConfig, data: ClientData, context: Context, policy: DevicePolicy, data_path: str,
                 n_items: int) -> None:
        super().__init__(cfg, data, context, policy)
        self.data_path, self.n_items, self.run_id = data_path, n_items, context.run_id

    def _saved_local_ledger(self) -> dict | None:
        """Local DP on a device: its ledger lives in its store, across runs (``fedrec-client status``)."""
        from client.store import DeviceStore

        with DeviceStore(self.data_path, create=False) as store:
            return store.ledger_state()

    def _keep_local_ledger(self, state: dict) -> None:
        from client.store import DeviceStore

        with DeviceStore(self.data_path, create=False) as store:
            store.set_ledger_state(state)

    def _check(self, parameters, model_round: int) -> None:
        """A model from the server is data: NaN/Inf, another catalogue or dimension, or an
        impossible round (which would pin it on the device) is refused before training on it."""
        check_received_model(parameters, n_items=self.n_items, model_round=model_round, dim=self.cfg.model.dim,
                             max_round=self.cfg.fed.rounds)

    def fit(self, parameters, config):
        rnd = int(config[keys.SERVER_ROUND]) - 1
        self._check(parameters, rnd)
        reply = super().fit(parameters, config)
        vector = self.state.array_records[keys.STATE_USER_VECTORS].to_numpy_ndarrays()[0][0]
        exact = int(config.get(keys.LOCAL_EPOCHS, self.cfg.fed.local_epochs)) == 1 and self.cfg.model.loss != "bpr"
        keep_on_device(self.data_path, parameters, rnd, self.cfg.model, self.data, vector, exact,
                       max_round=self.cfg.fed.rounds, run_id=self.run_id)
        return reply

    def evaluate(self, parameters, config):
        rnd = int(config.get(keys.SERVER_ROUND, 0))
        self._check(parameters, rnd)
        if keys.SERVER_ROUND in config:
            keep_on_device(self.data_path, parameters, rnd, self.cfg.model, self.data, None, False,
                           max_round=self.cfg.fed.rounds, run_id=self.run_id)
        return super().evaluate(parameters, config)


def device_policy(cfg: RunConfig | None, context: Context, policy: DevicePolicy | None) -> DevicePolicy:
    """The privacy floor of the device serving ``context``: the policy given to the ClientApp by
    the owner of a simulation (``simulate.py``: :meth:`DevicePolicy.for_run` of its config), or,
    under ``flwr run`` / on a SuperNode, the device store's policy made stricter by the node
    config (never anything from the run config, which is the server's)."""
    if policy is not None:
        return policy
    if cfg is not None:
        return DevicePolicy.for_run(cfg)
    base = None
    data_path = context.node_config.get(keys.NODE_DATA_PATH)
    if data_path:
        from client.store import DeviceStore

        with DeviceStore(str(data_path), create=False) as store:
            base = store.privacy_policy()
    return DevicePolicy.from_node_config(context.node_config, base)


def client_fn_for(cfg: RunConfig | None, policy: DevicePolicy | None = None):
    """A ``client_fn``; ``cfg=None`` reads the run config from the context (``flwr run``)."""

    def client_fn(context: Context):
        torch.set_num_threads(1)
        run_cfg = cfg or RunConfig.from_flat(dict(context.run_config))
        floor = device_policy(cfg, context, policy)
        adds_noise = floor.local_noise > 0 or (run_cfg.dp.enabled and run_cfg.dp.mode == "local")
        if cfg is None and run_cfg.dp.noise_seed >= 0 and adds_noise:
            raise PolicyRefusal(f"the run asks devices for seeded noise (dp.noise-seed={run_cfg.dp.noise_seed}): a "
                                "device draws its noise from its own secure source and takes no seed from the server")
        data_path = context.node_config.get(keys.NODE_DATA_PATH)
        if data_path and run_cfg.model.kind == "hybrid":
            raise ValueError("model.kind = hybrid runs in simulation only for now: a device's store keeps an MF "
                             "model and no item texts")
        if data_path:  # a real device: its own store, indexed by the item catalogue kept there
            data, n_items = device_client_data(str(data_path))
            return DeviceRecClient(run_cfg, data, context, floor, str(data_path), n_items).to_client()
        pid = int(context.node_config[keys.NODE_PARTITION_ID])
        data = simulated_client_data(run_cfg.data, pid, kind=run_cfg.fed.partition,
                                     num_silos=run_cfg.fed.num_silos, seed=run_cfg.seed)
        return RecClient(run_cfg, data, context, floor).to_client()

    return client_fn


def _without_plaintext_loss(call_next):
    """``call_next`` whose fit reply carries no training loss: under SecAgg+ the server is to see
    the cohort's sum only, and a per-client loss in plaintext would leak about that client."""

    def wrapped(msg, context):
        reply = call_next(msg, context)
        if not reply.has_error():
            metrics = reply.content.config_records.get(FIT_METRICS_RECORD)
            if metrics is not None:
                for key in (keys.M_TRAIN_LOSS, keys.M_TEXT_LOSS):
                    metrics.pop(key, None)
        return reply

    return wrapped


def secagg_when_requested(msg, context, call_next):
    """Run Flower's ``secaggplus_mod`` on training messages that carry the SecAgg+ protocol, and
    pass everything else through: one ClientApp serves runs with and without SecAgg+."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, _without_plaintext_loss(call_next))
    return call_next(msg, context)


def build_client_app(cfg: RunConfig | None = None, mods: list | None = None,
                     policy: DevicePolicy | None = None) -> ClientApp:
    """The ClientApp. ``cfg``: the simulation's config (its operator owns the simulated devices);
    ``policy``: their privacy floor (default :meth:`DevicePolicy.for_run` of ``cfg``)."""
    # Extra mods (tests: failure injection) run outside SecAgg+, like a device failing.
    return ClientApp(client_fn=client_fn_for(cfg, policy), mods=[*(mods or []), secagg_when_requested])


app = build_client_app()
