"""Flower ClientApp: a thin shell around the item model (:mod:`common.models`) and the device steps
(:mod:`common.device`).

What leaves the device each round: the dense item-side update (same shape for every client),
protected by the device's own privacy floor (:mod:`common.privacy.device`: its clip bound, and
under local DP its own noise), the number of users trained (1 on a device) and, only where the
server sees the update in plaintext anyway, the mean training loss. The user vector stays in
``context.state``. Evaluation returns sums of per-user ranking metrics and a user count.

On a real device (node_config ``data-path``) the data are the user's own, in a
:class:`client.store.DeviceStore`; the received global model and the user vector are kept there.
"""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.data import (
    check_received_model,
    device_client_data,
    keep_on_device,
    simulated_client_data,
    simulated_item_count,
)
from common import keys
from common.config import RunConfig
from common.data.texts import item_texts
from common.ddp_round import field_offset
from common.device import client_evaluate, protect
from common.models import ClientData, ItemModel, build_model
from common.privacy.device import DevicePolicy, PolicyRefusal, Protection, protection_for
from common.privacy.dp_fedavg import ledger_for, local_noise_for, release_event
from common.silo_dp import checked_history

log = logging.getLogger(__name__)

FIT_METRICS_RECORD = "fitres.metrics"  # where Flower's legacy FitRes keeps a client's metrics


class RecClient(NumPyClient):
    """One simulated device (or silo) training ``model``. ``policy`` is its owner's privacy floor:
    every update it sends is protected by it, whatever the server's instruction says
    (common/privacy/device.py)."""

    def __init__(self, cfg: RunConfig, data: ClientData, context: Context, policy: DevicePolicy | None = None, *,
                 model: ItemModel) -> None:
        self.cfg, self.data, self.state, self.model = cfg, data, context.state, model
        self.policy = policy or DevicePolicy.for_run(cfg)  # a simulated device: the operator's floor

    def get_properties(self, config):  # noqa: D102 - a pseudonymous id for sampling, and how many users
        return {keys.PROP_CLIENT_ID: int(self.data.client_id), keys.PROP_USERS: len(self.data.users)}

    def fit(self, parameters, config):
        protection = protection_for(self.policy, config)  # PolicyRefusal: nothing is sent
        params, context = self.model.receive(parameters, config)
        rnd = int(config[keys.SERVER_ROUND])
        epochs = int(config.get(keys.LOCAL_EPOCHS, self.cfg.fed.local_epochs))
        lr = float(config.get(keys.CLIENT_LR, self.cfg.fed.client_lr))
        if self.cfg.dp.silo_dp_sgd and self.cfg.fed.partition == "silo":
            step = self._silo_dp_sgd(params, rnd=rnd, epochs=epochs, lr=lr)
        else:
            step = self.model.train(params, context, self.data, epochs=epochs, lr=lr, seed=self.cfg.seed,
                                    server_round=rnd)
        self.state.array_records[keys.STATE_USER_VECTORS] = ArrayRecord([np.stack(step.user_vectors)])
        arrays = self._protect(step.update, self.model.arrays(params), protection, rnd, self.model.names(params))
        # num_examples = 1: every client weighs the same (user-level DP, SecAgg+ max_weight=1).
        metrics = {keys.M_TRAIN_LOSS: step.loss, keys.M_USERS: len(step.user_vectors), **step.metrics}
        return arrays, 1, self._metrics(metrics, protection)

    @staticmethod
    def _metrics(metrics: dict, protection: Protection) -> dict:
        """Plaintext metrics that go with the update. Under local and distributed DP the server is
        not trusted, and an un-noised training loss would leak about the user's data: it stays on
        the device (under SecAgg+ too: :func:`secagg_when_requested` drops it)."""
        if protection.local_noise is not None or protection.distributed is not None:
            return {k: v for k, v in metrics.items() if k not in (keys.M_TRAIN_LOSS, keys.M_TEXT_LOSS)}
        return metrics

    def _protect(self, update: list[np.ndarray], received: list[np.ndarray], protection: Protection, rnd: int,
                 names: tuple[str, ...]) -> list[np.ndarray]:
        """The device's protection (common/device.py): clip to its bound (its own, or the server's
        if tighter), its own noise when asked to or when its policy requires it, a last check;
        a local-DP release is recorded in the device's own ledger."""
        noise = local_noise_for(self.policy.noise_seed, rnd, self.data.client_id)
        try:
            arrays = protect(self.model, update, [np.shape(p) for p in received], protection, noise=noise)
        except ValueError as exc:
            raise ValueError(f"client {self.data.client_id}: {exc}") from None
        if protection.local_noise is not None:
            self._record_local_release(protection.local_noise, rnd, names)
        if protection.distributed is not None:
            # Field elements k ∈ [0, M) as the floats k − (M−1)/2 that SecAgg+'s quantizer (range
            # ±(M−1)/2 over M−1 levels: one level per unit) turns back into exactly k.
            arrays = [np.asarray(arrays[0], dtype=np.float64) - field_offset(protection.distributed.params.modulus)]
        return arrays

    def _record_local_release(self, sigma: float, rnd: int, names: tuple[str, ...]) -> None:
        """Local DP: what the device released, in its own ledger (secure noise unless its owner
        seeded it)."""
        ledger = ledger_for("local", self.cfg.dp.delta)
        saved = self._saved_local_ledger()
        if saved:
            ledger.load_state_dict(saved)
        # A ledger kept across runs (a device's store) sees rounds start again: number on.
        last = ledger.events[-1].round if ledger.events else 0
        ledger.record(release_event("local", noise_multiplier=sigma, sample_rate=1.0, parameters=names,
                                    server_round=rnd if rnd > last else last + 1))
        self._keep_local_ledger(ledger.state_dict())

    def _saved_local_ledger(self) -> dict | None:
        saved = self.state.config_records.get(keys.STATE_LOCAL_LEDGER)
        return json.loads(str(saved["json"])) if saved else None

    def _keep_local_ledger(self, state: dict) -> None:
        self.state.config_records[keys.STATE_LOCAL_LEDGER] = ConfigRecord({"json": json.dumps(state)})

    def _silo_dp_sgd(self, params, *, rnd: int, epochs: int, lr: float):
        """A silo: DP-SGD with one user as the unit (a model that offers ``train_dp_sgd``), ε
        composed across rounds from the accountant history kept in this node's state (never
        restarted); this round's history entry goes to the server, which keeps every silo's
        history with its checkpoint."""
        train_dp_sgd = getattr(self.model, "train_dp_sgd", None)
        if train_dp_sgd is None:
            raise ValueError(f"dp.silo-dp-sgd is not available for model.kind = {self.model.kind}")
        saved = self.state.config_records.get(keys.STATE_DPSGD_HISTORY)
        history = checked_history(json.loads(str(saved["json"]))) if saved else []
        step, history = train_dp_sgd(params, self.data, dp=self.cfg.dp, epochs=epochs, lr=lr, seed=self.cfg.seed,
                                     server_round=rnd, history=history, secure=self.policy.noise_seed is None)
        self.state.config_records[keys.STATE_DPSGD_HISTORY] = ConfigRecord({"json": json.dumps(history)})
        return step

    def evaluate(self, parameters, config):
        params, context = self.model.receive(parameters, config)
        metrics = client_evaluate(self.model.effective(params, context), self.data, model=self.cfg.model,
                                  phase=str(config.get(keys.PHASE, "test")), seed=self.cfg.seed)
        users = int(metrics.pop("users"))
        return 0.0, users, {k: float(v) for k, v in metrics.items()}


class DeviceRecClient(RecClient):
    """A real device (node_config ``data-path``): trains on its DeviceStore and keeps there the
    global model it receives and its new user vector, so ``fedrec-client recommend`` works offline."""

    def __init__(self, cfg: RunConfig, data: ClientData, context: Context, policy: DevicePolicy, data_path: str,
                 n_items: int, *, model: ItemModel) -> None:
        super().__init__(cfg, data, context, policy, model=model)
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

    def _check(self, parameters, config, model_round: int) -> list[np.ndarray]:
        """A model from the server is data: NaN/Inf in any array, another catalogue or dimension,
        or an impossible round (which would pin it on the device) is refused before training on
        it. Returns the item side as the device keeps it (one vector and one bias per item: for
        the hybrid, free part + text vectors), which ``fedrec-client recommend`` scores with."""
        check_received_model(parameters, n_items=self.n_items, model_round=model_round, dim=self.cfg.model.dim,
                             max_round=self.cfg.fed.rounds)
        effective = self.model.effective(*self.model.receive(parameters, config))
        kept = [effective.embeddings, effective.bias]
        check_received_model(kept, n_items=self.n_items, model_round=model_round, dim=self.cfg.model.dim,
                             max_round=self.cfg.fed.rounds)
        return kept

    def fit(self, parameters, config):
        rnd = int(config[keys.SERVER_ROUND]) - 1
        kept = self._check(parameters, config, rnd)
        reply = super().fit(parameters, config)
        vector = self.state.array_records[keys.STATE_USER_VECTORS].to_numpy_ndarrays()[0][0]
        exact = int(config.get(keys.LOCAL_EPOCHS, self.cfg.fed.local_epochs)) == 1 and self.cfg.model.loss != "bpr"
        keep_on_device(self.data_path, kept, rnd, self.cfg.model, self.data, vector, exact,
                       max_round=self.cfg.fed.rounds, run_id=self.run_id)
        return reply

    def evaluate(self, parameters, config):
        rnd = int(config.get(keys.SERVER_ROUND, 0))
        kept = self._check(parameters, config, rnd)
        if keys.SERVER_ROUND in config:
            keep_on_device(self.data_path, kept, rnd, self.cfg.model, self.data, None, False,
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
        adds_noise = (floor.local_noise > 0 or floor.distributed_noise > 0
                      or (run_cfg.dp.enabled and run_cfg.dp.mode in ("local", "distributed")))
        if cfg is None and run_cfg.dp.noise_seed >= 0 and adds_noise:
            raise PolicyRefusal(f"the run asks devices for seeded noise (dp.noise-seed={run_cfg.dp.noise_seed}): a "
                                "device draws its noise from its own secure source and takes no seed from the server")
        data_path = context.node_config.get(keys.NODE_DATA_PATH)
        if data_path:  # a real device: its own store, indexed by the item catalogue kept there
            data, n_items = device_client_data(str(data_path))
            model = build_model(run_cfg.model, n_items=n_items, seed=run_cfg.seed,
                                texts=functools.partial(_device_texts, str(data_path)))
            return DeviceRecClient(run_cfg, data, context, floor, str(data_path), n_items, model=model).to_client()
        pid = int(context.node_config[keys.NODE_PARTITION_ID])
        data = simulated_client_data(run_cfg.data, pid, kind=run_cfg.fed.partition,
                                     num_silos=run_cfg.fed.num_silos, seed=run_cfg.seed)
        model = build_model(run_cfg.model, n_items=simulated_item_count(run_cfg.data), seed=run_cfg.seed,
                            texts=lambda: item_texts(run_cfg.data))
        return RecClient(run_cfg, data, context, floor, model=model).to_client()

    return client_fn


def _device_texts(data_path: str) -> tuple[str, ...]:
    """The item texts the device keeps (imported with the server's items file)."""
    from client.store import DeviceStore

    with DeviceStore(data_path, create=False) as store:
        texts = store.item_texts()
    if texts is None:
        raise ValueError(f"{data_path}: this run's model reads item texts and this device keeps none for its "
                         "catalogue: import the server's items file again (fedrec-client import --items items.csv; "
                         "a file from this version of fedrec has a text column)")
    return texts


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
    if msg.metadata.message_type == MessageType.TRAIN and _asks_distributed(msg):
        # A distributed-DP encoding carries only a 1/m share of the noise: outside SecAgg+ the server
        # would see it almost un-noised. The device refuses before training.
        log.warning("refusing a distributed-DP round outside SecAgg+")
        return Message(Error(REFUSED_OUTSIDE_SECAGG, "distributed DP is only sent inside SecAgg+"), reply_to=msg)
    return call_next(msg, context)


#: Error code of a training message a device refuses (a distributed-DP round without SecAgg+).
REFUSED_OUTSIDE_SECAGG = 901


def _asks_distributed(msg) -> bool:
    return any(keys.DISTRIBUTED in record for record in msg.content.config_records.values())



def build_client_app(cfg: RunConfig | None = None, mods: list | None = None,
                     policy: DevicePolicy | None = None) -> ClientApp:
    """The ClientApp. ``cfg``: the simulation's config (its operator owns the simulated devices);
    ``policy``: their privacy floor (default :meth:`DevicePolicy.for_run` of ``cfg``)."""
    # Extra mods (tests: failure injection) run outside SecAgg+, like a device failing.
    if mods is None and policy is None:
        return _RunConfigClientApp() if cfg is None else _SimulationClientApp(cfg)
    return ClientApp(client_fn=client_fn_for(cfg, policy), mods=[*(mods or []), secagg_when_requested])


class _SimulationClientApp(ClientApp):
    """The simulation's ClientApp, pickled as its config. Flower's Ray backend pickles the
    ClientApp with every message it sends a simulated client; a ClientApp of closures is pickled
    by value, which cost ~2.4 ms of the driver's time per message (cloudpickle walks
    ``sys.modules`` for every module the closures use: ~1 s per SecAgg+ round of ~400 messages).
    As a config it costs ~0.1 ms, and the worker builds the same app from it."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(client_fn=client_fn_for(cfg), mods=[secagg_when_requested])
        self._flat = cfg.to_flat()

    def __reduce__(self):
        return (_simulation_client_app, (self._flat,))


_SIMULATION_APPS: dict[str, ClientApp] = {}  # one app per config in a worker process (it keeps no state)


def _simulation_client_app(flat: dict) -> ClientApp:
    key = json.dumps(flat, sort_keys=True)
    app = _SIMULATION_APPS.get(key)
    if app is None:  # parsing and checking the config took ~5% of a worker's time per message
        app = _SIMULATION_APPS[key] = _SimulationClientApp(RunConfig.from_flat(flat))
    return app


class _RunConfigClientApp(ClientApp):
    """``client.app:app``: the ClientApp that reads the run config from its context (``flwr
    run``, a SuperNode). Under ``flwr run`` against a simulation federation Flower's Ray backend
    pickles it with every message, as :class:`_SimulationClientApp`; it is pickled as a
    reference to :func:`build_client_app` (the worker builds the same app)."""

    def __init__(self) -> None:
        super().__init__(client_fn=client_fn_for(None), mods=[secagg_when_requested])

    def __reduce__(self):
        return (build_client_app, ())


app = build_client_app()
