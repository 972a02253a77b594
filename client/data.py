"""Where a client's data comes from: in simulation, its partition of the configured data set."""

from __future__ import annotations

import functools

import numpy as np

from common.config import DataConfig
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
