"""The simulation keeps its node set once every client has registered (server/grid.py
``BoundedGrid.get_node_ids``); a deployment (no expected population) asks Flower every time.
On a real Flower in-memory state and grid, as run_simulation builds them."""

from __future__ import annotations

import pytest
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from server import grid as grid_module
from server.grid import BoundedGrid

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _grid(nodes: int):
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 11, NOOP_FEDERATION_ID
    state.run_ids[7] = RunRecord(run=run)
    state.task_store[11] = Task(task_id=11, run_id=7)
    vce_api._register_nodes(num_nodes=nodes, state_factory=factory)
    inner = InMemoryGrid(state_factory=factory)
    inner.set_run(run)
    return inner, factory


def test_a_deployment_sees_a_new_node_at_once():
    inner, factory = _grid(3)
    grid = BoundedGrid(inner, 10.0, lambda n, r: None)
    assert grid.get_node_ids() == set(inner.get_node_ids()) and len(grid.get_node_ids()) == 3
    vce_api._register_nodes(num_nodes=1, state_factory=factory)
    assert len(grid.get_node_ids()) == 4


def test_a_simulation_keeps_its_full_node_set_until_the_ttl(monkeypatch):
    inner, factory = _grid(3)
    grid = BoundedGrid(inner, 10.0, lambda n, r: None, stable_nodes=4)
    assert len(grid.get_node_ids()) == 3  # not all registered yet: asked again next time
    vce_api._register_nodes(num_nodes=1, state_factory=factory)
    assert len(grid.get_node_ids()) == 4  # now complete: kept
    vce_api._register_nodes(num_nodes=1, state_factory=factory)
    assert len(grid.get_node_ids()) == 4
    monkeypatch.setattr(grid_module, "NODE_IDS_TTL", 0.0)
    assert len(grid.get_node_ids()) == 5  # after the TTL, Flower's set again


def test_the_in_memory_grid_polls_replies_more_often():
    inner, _ = _grid(1)
    assert inner.pull_interval == 0.1  # Flower's default
    BoundedGrid(inner, 10.0, lambda n, r: None)
    assert inner.pull_interval == 0.02
