"""Deployment on Flower 1.42's SuperLink/SuperNode runtime, by trade:

=================  ==========================================================================
``pki``            TLS material (CA, server certificate; host names checked) and SuperNode keys
``commands``       the exact command lines of Flower's processes, the ``flwr`` connection file
``processes``      start processes (umask 077) with a log each, stop whole trees by PID
``flwr_cli``       the operator's ``flwr`` CLI from Python: nodes, runs and their real status
``signing``        the publisher key, signed app bundles, SuperNodes' trusted entities
``proxy``          nginx: the public port, the Fleet API calls only
``hub``            the SuperLink's app hub on 127.0.0.1: the one signed app bundle
``serverhost``     :class:`ServerHost`: nginx, the SuperLink (loopback) and its SuperExec
``orchestrator``   :class:`Deployment`: a server host and SuperNodes on this machine
``catalog``        the item list devices import before they join
=================  ==========================================================================

What runs where (see docs/DEPLOY.md)::

    server host   nginx              the public HTTPS port: the Fleet API calls, nothing else
                  flower-superlink   127.0.0.1 only: Fleet, Control (`flwr`) and Runtime API, TLS,
                                     node auth, SQLite state, --isolation process
                  flower-superexec   signs its Runtime API calls with the SuperExec secret;
                                     spawns `flwr-serverapp` per run
                  flwr run / ls      the operator's CLI, on the server host (Control API, loopback)
    device        flower-supernode   dials the proxy (TLS checked against ca.crt, signed with its
                                     own P-384 key), runs only app bundles signed by the
                                     publisher key; spawns `flwr-clientapp` per message

``from server import deploy`` gives every public name of the submodules (``deploy.Deployment``,
``deploy.make_ca_and_certs``, ...).
"""

from server.deploy.catalog import write_catalog
from server.deploy.commands import (
    CONNECTION,
    HUB_PORT,
    PUBLIC_PORT,
    SUPERLINK_PORT,
    executable,
    superexec_command,
    superlink_command,
    supernode_command,
    write_flwr_config,
    write_secret,
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
from server.deploy.pki import (
    DEFAULT_HOSTS,
    NodeKey,
    TLSFiles,
    make_ca,
    make_ca_and_certs,
    make_node_keys,
    make_server_cert,
    validate_host,
    validate_hosts,
)
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
from server.deploy.proxy import FLEET_PATHS, nginx_executable, write_nginx_config
from server.deploy.serverhost import ServerHost
from server.deploy.signing import (
    PublisherKey,
    SignedApp,
    app_spec,
    build_fab,
    load_signed_app,
    make_publisher_key,
    sign_fab,
    write_trusted_entities,
)

__all__ = [
    "APP_PARTS",
    "CONNECTION",
    "DEFAULT_HOSTS",
    "DeployError",
    "Deployment",
    "FINISHED",
    "FLEET_PATHS",
    "HUB_PORT",
    "Node",
    "NodeKey",
    "PROJECT_ROOT",
    "PUBLIC_PORT",
    "Proc",
    "PublisherKey",
    "RunStatus",
    "SUPERLINK_PORT",
    "ServerHost",
    "SignedApp",
    "TLSFiles",
    "app_spec",
    "build_fab",
    "copy_app",
    "executable",
    "flwr_cli",
    "free_port",
    "list_nodes",
    "list_runs",
    "load_signed_app",
    "make_ca",
    "make_ca_and_certs",
    "make_node_keys",
    "make_publisher_key",
    "make_server_cert",
    "nginx_executable",
    "port_open",
    "register_node",
    "run_and_wait",
    "run_log",
    "sign_fab",
    "start_process",
    "start_run",
    "stop_process",
    "stop_processes",
    "stop_run",
    "superexec_command",
    "superlink_command",
    "supernode_command",
    "tail",
    "validate_host",
    "validate_hosts",
    "wait_for_port",
    "wait_for_run",
    "write_catalog",
    "write_flwr_config",
    "write_nginx_config",
    "write_run_config",
    "write_secret",
    "write_trusted_entities",
]
