"""The simulation's message hand-out (server/vce_polling.py) gives, on a real Flower in-memory
link state set up as ``run_simulation`` sets it up, exactly what Flower's own per-node loop gives;
and the simulation's ClientApp pickles as its config (client/app.py), not by value."""

from __future__ import annotations

import pickle
import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.proto.task_pb2 import Task  # noqa: F401  (the state's task store, as run_simulation fills it)
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from server import vce_polling

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _state_with_messages(spec: list[tuple[int, str, float]]):
    """A link state as run_simulation builds it (run pre-registered, nodes registered by
    Flower's own ``_register_nodes``) and messages pushed through Flower's InMemoryGrid:
    ``spec`` = (node index, tag, ttl)."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id = 11
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[11] = Task(task_id=11, run_id=run.run_id)
    mapping = vce_api._register_nodes(num_nodes=6, state_factory=factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    nodes = list(mapping)
    msgs = [Message(RecordDict({"c": ConfigRecord({"tag": tag})}), nodes[i], "train", ttl=ttl, group_id="1")
            for i, tag, ttl in spec]
    assert len(list(grid.push_messages(msgs))) == len(msgs)
    return state, mapping


def _flower_sweep(state, mapping):
    out = []
    for node_id in mapping:
        out.extend(state.get_message_ins(node_id=node_id, limit=1))
    return out


SPEC = [(0, "a", 60.0), (2, "b1", 60.0), (2, "b2", 60.0), (5, "c", 60.0), (3, "gone", 0.05), (4, "d", 60.0)]


def test_one_pass_hands_out_what_flowers_per_node_loop_does_sweep_by_sweep():
    ours, ours_map = _state_with_messages(SPEC)
    flowers, flowers_map = _state_with_messages(SPEC)
    time.sleep(0.1)  # "gone" expires: both must drop it
    # node ids are random per state: compare by each node's index in its mapping
    def by_index(messages, mapping):
        return sorted((mapping[m.metadata.dst_node_id], str(m.content.config_records["c"]["tag"])) for m in messages)

    sweeps = []
    for _ in range(3):
        a = vce_polling.pending_messages(ours, set(ours_map))
        b = _flower_sweep(flowers, flowers_map)
        sweeps.append(by_index(a, ours_map))
        assert by_index(a, ours_map) == by_index(b, flowers_map)
        assert all(m.metadata.delivered_at != "" for m in a)
    # one message per node per sweep (node 2's second waits), the expired one never, then nothing
    assert sweeps == [[(0, "a"), (2, "b1"), (4, "d"), (5, "c")], [(2, "b2")], []]
    assert not any("gone" == str(m.content.config_records["c"]["tag"]) for m in ours.message_ins_store.values())


def test_only_the_runs_nodes_get_messages():
    state, mapping = _state_with_messages(SPEC)
    some = set(list(mapping)[:3])
    got = vce_polling.pending_messages(state, some)
    assert {m.metadata.dst_node_id for m in got} <= some
    assert {mapping[m.metadata.dst_node_id] for m in got} == {0, 2}


def test_install_replaces_flowers_loop_for_this_flower_and_uninstall_restores_it():
    vce_polling.uninstall()  # a simulation earlier in this process may have installed it
    original = vce_api.add_messages_to_queue
    assert original is not vce_polling.add_messages_to_queue
    try:
        assert vce_polling.install() is True
        assert vce_api.add_messages_to_queue is vce_polling.add_messages_to_queue
        vce_polling.install()  # twice: the original is kept, not the replacement
    finally:
        vce_polling.uninstall()
    assert vce_api.add_messages_to_queue is original


def test_another_flower_version_keeps_flowers_loop(monkeypatch):
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.99.0")
    vce_polling.uninstall()  # a simulation earlier in this process may have installed it
    original = vce_api.add_messages_to_queue
    assert original is not vce_polling.add_messages_to_queue
    assert vce_polling.install() is False
    assert vce_api.add_messages_to_queue is original


def test_the_simulation_client_app_pickles_as_its_config():
    """Flower's Ray backend pickles the ClientApp with every message; closures would be pickled
    by value (slow). The standard pickle module cannot pickle closures at all: it works only
    because the app reduces to (module-level factory, flat config)."""
    from client.app import _SimulationClientApp, build_client_app
    from common.config import RunConfig

    cfg = RunConfig().replace(**{"fed.rounds": 3, "model.dim": 8})
    app = build_client_app(cfg)
    back = pickle.loads(pickle.dumps(app))
    assert isinstance(back, _SimulationClientApp)
    assert RunConfig.from_flat(back._flat) == cfg
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(build_client_app(cfg, mods=[lambda m, c, n: n(m, c)]))  # extra mods: by value, as before


def test_the_flwr_run_client_app_pickles_as_a_reference():
    """``client.app:app`` (``flwr run`` against a simulation federation) is pickled with every
    message too: as a reference to its factory, not as closures."""
    from client.app import _RunConfigClientApp, app

    data = pickle.dumps(app)
    assert isinstance(pickle.loads(data), _RunConfigClientApp) and len(data) < 200
