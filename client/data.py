"""Where a client's data comes from: in simulation, its partition of the configured data set."""

from __future__ import annotations

import functools

import numpy as np

from common.config import DataConfig, ModelConfig
from common.data import load_interactions
from common.data.partition import partition_users
from common.data.splits import split_interactions
from common.evaluation import EvalSets
from common.federated import ClientData


@functools.lru_cache(maxsize=2)
def _eval_sets(data: DataConfig) -> EvalSets:
    # One load per worker process; simulated clients in the same process share it.
    interactions = load_interactions(data.source, data.format, data.item_file or None)
    split = split_interactions(interactions, data.split, seed=data.seed, cold_fraction=data.cold_fraction)
    return EvalSets.from_split(split)


@functools.lru_cache(maxsize=4)
def _partitions(data: DataConfig, kind: str, num_silos: int, seed: int) -> tuple[np.ndarray, ...]:
    return tuple(partition_users(len(_eval_sets(data).train), kind, num_silos=num_silos, seed=seed))


def num_clients(data: DataConfig, kind: str, num_silos: int, seed: int) -> int:
    return len(_partitions(data, kind, num_silos, seed))


def simulated_client_data(data: DataConfig, partition_id: int, *, kind: str, num_silos: int, seed: int) -> ClientData:
    parts = _partitions(data, kind, num_silos, seed)
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} out of range: the data gives {len(parts)} clients")
    return ClientData.from_sets(partition_id, parts[partition_id], _eval_sets(data))


# ---------------------------------------------------------------- a real device (node_config "data-path")
# Its data is its own DeviceStore (client/store.py). The rows of the global model stand for the
# item ids of the catalogue kept in that store: the server's items file, imported once with
# `fedrec-client import --items items.csv` before `fedrec-client join`.

def device_client_data(data_path: str) -> tuple[ClientData, int]:
    """The device's ClientData and the catalogue size (the global model must have as many items)."""
    from client.store import DeviceStore

    with DeviceStore(data_path, create=False) as store:
        item_ids = store.catalog()[0]
        if not item_ids:
            raise ValueError(f"{data_path}: no item catalogue on this device: import the server's items file "
                             "(fedrec-client import --items items.csv) before joining")
        return store.client_data({item: i for i, item in enumerate(item_ids)}), len(item_ids)


def keep_on_device(data_path: str, parameters: list[np.ndarray], model_round: int, model: ModelConfig,
                   data: ClientData, vector: np.ndarray | None, exact: bool) -> None:
    """Keep the global model a device received (when newer than the stored one) and its new
    user vector. ``exact``: the vector is what reconstruction against this model gives (one
    local epoch, deterministic loss), so ``fedrec-client recommend`` may use it as is."""
    from client.store import DeviceStore, user_vector_fingerprint

    with DeviceStore(data_path, create=False) as store:
        stored = store.get_global_model()
        if stored is None or stored.round is None or model_round >= stored.round:
            store.set_global_model(store.catalog()[0], parameters[0], parameters[1], model_round,
                                   loss=model.loss, user_reg=model.user_reg)
        if vector is not None:
            user = data.train[0]
            key = user_vector_fingerprint(np.asarray(parameters[0], dtype=np.float32),
                                          np.asarray(parameters[1], dtype=np.float32),
                                          user.items, user.ratings, model.loss, model.user_reg) if exact else ""
            store.set_user_vector(vector, fingerprint=key)
