"""Where a client's data comes from: in simulation, its partition of the configured data set."""

from __future__ import annotations

import functools
import logging

import numpy as np

from common.choices import Partition, Split
from common.config import DataConfig, ModelConfig
from common.data import load_interactions
from common.data.partition import partition_users
from common.data.splits import split_interactions
from common.data.synthetic import SyntheticUsers, is_synthetic_source, synthetic_source
from common.evaluation import EvalSets
from common.models import ClientData, UserData

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def _eval_sets(data: DataConfig) -> EvalSets:
    # One load per worker process; simulated clients in the same process share it.
    interactions = load_interactions(data.source, data.format, data.item_file or None)
    split = split_interactions(interactions, data.split, seed=data.seed, cold_fraction=data.cold_fraction)
    return EvalSets.from_split(split)


def _per_user_source(data: DataConfig) -> SyntheticUsers | None:
    """The users of a synthetic source whose split is per user (random, leave-last-out): a
    client's data is then built from its own users alone, never from the whole data set (the
    memory of 100,000 idle simulated clients). None for read data and the cold-item split."""
    if not is_synthetic_source(data.source) or data.split == Split.COLD_ITEM:
        return None
    return synthetic_source(data.source, data.format)


def _user_count(data: DataConfig) -> int:
    if is_synthetic_source(data.source):
        return synthetic_source(data.source, data.format).n_users  # nothing generated
    return len(_eval_sets(data).train)


@functools.lru_cache(maxsize=4)
def _partitions(data: DataConfig, kind: str, num_silos: int, seed: int) -> tuple[np.ndarray, ...]:
    return tuple(partition_users(_user_count(data), kind, num_silos=num_silos, seed=seed))


def simulated_item_count(data: DataConfig) -> int:
    """How many items the configured data set has (the rows of the global model)."""
    if is_synthetic_source(data.source):
        return synthetic_source(data.source, data.format).n_items  # nothing generated
    return _eval_sets(data).n_items


def num_clients(data: DataConfig, kind: str, num_silos: int, seed: int) -> int:
    if kind == Partition.USER and is_synthetic_source(data.source):
        return _user_count(data)  # one client per user, without 100,000 one-user partitions
    return len(_partitions(data, kind, num_silos, seed))


def simulated_client_data(data: DataConfig, partition_id: int, *, kind: str, num_silos: int, seed: int) -> ClientData:
    users = _per_user_source(data)
    if users is not None:
        n = num_clients(data, kind, num_silos, seed)
        if not 0 <= partition_id < n:
            raise ValueError(f"partition-id {partition_id} out of range: the data gives {n} clients")
        held = [partition_id] if kind == Partition.USER else _partitions(data, kind, num_silos, seed)[partition_id]
        return _synthetic_client(users, partition_id, held, data)
    parts = _partitions(data, kind, num_silos, seed)
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} out of range: the data gives {len(parts)} clients")
    return ClientData.from_sets(partition_id, parts[partition_id], _eval_sets(data))


def _synthetic_client(users: SyntheticUsers, client_id: int, held, data: DataConfig) -> ClientData:
    """What ``ClientData.from_sets`` gives these users of the whole split, from their rows alone."""
    splits = [users.user_split(int(u), data.split, seed=data.seed) for u in held]
    return ClientData(
        client_id=client_id,
        users=tuple(int(u) for u in held),
        train=tuple(UserData(train, ratings) for train, ratings, _, _ in splits),
        valid=tuple(valid for _, _, valid, _ in splits),
        test=tuple(test for _, _, _, test in splits),
    )


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


#: No run has more rounds than this (a round takes seconds at least): a model that claims a later
#: round is refused, so that it can never pin itself as "the newest" on a device.
MAX_MODEL_ROUND = 1_000_000


def round_bound(max_round: int | None) -> int:
    """The latest round a received model may claim: the run's rounds, at most MAX_MODEL_ROUND."""
    return MAX_MODEL_ROUND if max_round is None else min(int(max_round), MAX_MODEL_ROUND)


def check_received_model(parameters: list[np.ndarray], *, n_items: int, model_round: int, dim: int | None = None,
                         max_round: int | None = None) -> None:
    """Refuse a global model from the server that a device must neither train on nor keep.

    Parameters
    ----------
    parameters:
        The received arrays: item embeddings (I, d) and item biases (I,) first; any further
        arrays (the hybrid's head and adapter, its text vectors) must be finite floats too.
    n_items:
        The size of this device's item catalogue: the model must have one row per item.
    model_round:
        The rounds completed when it was sent (``server-round - 1`` in fit, ``server-round`` in
        evaluate).
    dim:
        The run's ``model.dim``, when known: the embeddings must have that many columns.
    max_round:
        The most rounds this run can have (its ``fed.rounds``), never above :data:`MAX_MODEL_ROUND`
        (the run config comes from the server too).

    Raises
    ------
    ValueError
        Naming what is wrong: missing arrays, a shape that disagrees with the catalogue or the
        dimension, a non-float array, NaN/Inf (also after the cast to float32 the device stores),
        or a round that is negative, not a whole number, or beyond what a run can have.
    """
    if len(parameters) < 2:
        raise ValueError(f"global model refused: expected item embeddings and biases, got {len(parameters)} arrays")
    emb, bias = np.asarray(parameters[0]), np.asarray(parameters[1])
    if emb.dtype.kind != "f" or bias.dtype.kind != "f":
        raise ValueError(f"global model refused: expected float arrays, got {emb.dtype} and {bias.dtype}")
    if emb.ndim != 2 or emb.shape[0] != n_items or emb.shape[1] < 1:
        raise ValueError(f"global model refused: embeddings of shape {emb.shape}, this device's catalogue has "
                         f"{n_items} items (import the server's items file: fedrec-client import --items)")
    if dim is not None and emb.shape[1] != dim:
        raise ValueError(f"global model refused: embeddings of dimension {emb.shape[1]}, the run's model.dim is {dim}")
    if bias.shape != (n_items,):
        raise ValueError(f"global model refused: biases of shape {bias.shape}, expected ({n_items},)")
    rest = [(k, np.asarray(a)) for k, a in enumerate(parameters[2:], start=2)]
    for k, array in rest:  # a text head or adapter is trained on like the item vectors
        if array.dtype.kind != "f":
            raise ValueError(f"global model refused: array {k} is {array.dtype}, expected floats")
    with np.errstate(over="ignore", invalid="ignore"):
        for name, array in (("embeddings", emb), ("biases", bias), *((f"values of array {k}", a) for k, a in rest)):
            bad = int(array.size - np.count_nonzero(np.isfinite(array.astype(np.float32))))
            if bad:
                raise ValueError(f"global model refused: {bad} of {array.size} {name} are NaN or Inf "
                                 "(or beyond float32)")
    bound = round_bound(max_round)
    if isinstance(model_round, bool) or not isinstance(model_round, (int, np.integer)):
        raise ValueError(f"global model refused: round {model_round!r} is not a whole number")
    if not 0 <= model_round <= bound:
        raise ValueError(f"global model refused: round {model_round} is outside [0, {bound}], "
                         "the rounds a run can have")


def keep_on_device(data_path: str, parameters: list[np.ndarray], model_round: int, model: ModelConfig,
                   data: ClientData, vector: np.ndarray | None, exact: bool, *, max_round: int | None = None,
                   run_id: int | None = None) -> None:
    """Keep the global model a device received and its new user vector. ``exact``: the vector is
    what reconstruction against this model gives (one local epoch, deterministic loss), so
    ``fedrec-client recommend`` may use it as is.

    The model is checked first (:func:`check_received_model`, with ``model.dim`` and
    ``max_round``): a bad one raises ValueError and nothing is kept. It replaces the stored model
    when it is at least as new (round), when it comes from another run (``run_id``, Flower's
    ``context.run_id``: a new run starts at round 1 again), or when the stored one is damaged or
    claims a round beyond what a run can have: nothing pins a model on the device for good.
    """
    from client.store import DeviceStore, StoreError, user_vector_fingerprint

    with DeviceStore(data_path, create=False) as store:
        item_ids = store.catalog()[0]
        check_received_model(parameters, n_items=len(item_ids), model_round=model_round, dim=model.dim,
                             max_round=max_round)
        try:
            stored = store.get_global_model()
        except StoreError as exc:  # damaged: replaced by this one rather than blocking every future model
            log.warning("%s; replacing it with the model of round %d", exc, model_round)
            stored = None
        bound = round_bound(max_round)
        if (stored is None or stored.round is None or model_round >= stored.round or stored.round > bound
                or (run_id is not None and stored.run != run_id)):
            store.set_global_model(item_ids, parameters[0], parameters[1], model_round, loss=model.loss,
                                   user_reg=model.user_reg, run=run_id)
        if vector is not None:
            if not np.isfinite(vector).all():
                log.warning("%s: the new user vector has NaN/Inf values and is not kept", data_path)
                return
            user = data.train[0]
            key = user_vector_fingerprint(np.asarray(parameters[0], dtype=np.float32),
                                          np.asarray(parameters[1], dtype=np.float32),
                                          user.items, user.ratings, model.loss, model.user_reg) if exact else ""
            store.set_user_vector(vector, fingerprint=key)
