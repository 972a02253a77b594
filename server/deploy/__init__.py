"""Deployment on Flower 1.42's SuperLink/SuperNode runtime, by trade:

=================  ==========================================================================
``pki``            TLS material (CA, server certificate) and SuperNode key pairs
``commands``       the exact command lines of Flower's processes, the ``flwr`` connection file
``processes``      start processes with a log each, wait for ports, stop whole trees by PID
``flwr_cli``       the operator's ``flwr`` CLI from Python: nodes, runs and their real status
``orchestrator``   :class:`Deployment`: a whole federation on this machine
``catalog``        the item list devices import before they join
=================  ==========================================================================

What runs where (see docs/DEPLOY.md)::

    server host   flower-superlink   one HTTPS port (Fleet API for SuperNodes, Control API for
                                     `flwr`, Runtime API for the ServerApp), TLS, node auth,
                                     a persistent SQLite state; spawns `flwr-serverapp` per run
                  flwr run / ls      the operator's CLI, talks to the Control API
    device        flower-supernode   dials the SuperLink (TLS checked against ca.crt, signed
                                     with its own P-384 key); spawns `flwr-clientapp` per message

``from server import deploy`` gives every public name of the submodules (``deploy.Deployment``,
``deploy.make_ca_and_certs``, ...).
"""

from server.deploy.catalog import write_catalog
from server.deploy.commands import (
    CONNECTION,
    executable,
    superlink_command,
    supernode_command,
    write_flwr_config,
)
from server.deploy.errors import DeployError
from server.deploy.flwr_cli import (
    APP_PARTS,
    FINISHED,
    PROJECT_ROOT,
    RunStatus,
    copy_app,
    flwr_cli,
    list_nodes,
    list_runs,
    register_node,
    run_and_wait,
    run_log,
    start_run,
    stop_run,
    wait_for_run,
    write_run_config,
)
from server.deploy.orchestrator import Deployment, Node
from server.deploy.pki import DEFAULT_HOSTS, NodeKey, TLSFiles, make_ca_and_certs, make_node_keys
from server.deploy.processes import (
    Proc,
    free_port,
    port_open,
    start_process,
    stop_process,
    stop_processes,
    tail,
    wait_for_port,
)

__all__ = [
    "APP_PARTS", "CONNECTION", "DEFAULT_HOSTS", "FINISHED", "PROJECT_ROOT", "DeployError", "Deployment", "Node",
    "NodeKey", "Proc", "RunStatus", "TLSFiles", "copy_app", "executable", "flwr_cli", "free_port", "list_nodes",
    "list_runs", "make_ca_and_certs", "make_node_keys", "port_open", "register_node", "run_and_wait", "run_log",
    "start_process", "start_run", "stop_process", "stop_processes", "stop_run", "superlink_command",
    "supernode_command", "tail", "wait_for_port", "wait_for_run", "write_catalog", "write_flwr_config",
    "write_run_config",
]
