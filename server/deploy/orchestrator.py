"""A whole federation on this machine: :class:`Deployment` (``fedrec deploy local``, tests): a
:class:`~server.deploy.serverhost.ServerHost` and one SuperNode per device store."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.deploy.commands import supernode_command
from server.deploy.errors import DeployError
from server.deploy.flwr_cli import RunStatus, list_nodes, register_node, run_log, start_run, stop_run, wait_for_run
from server.deploy.pki import DEFAULT_HOSTS, NodeKey, TLSFiles, make_ca_and_certs, make_node_keys
from server.deploy.processes import Proc, Started, free_port, start_process, stop_processes, tail
from server.deploy.serverhost import ServerHost
from server.deploy.signing import PublisherKey, SignedApp, build_fab, make_publisher_key, sign_fab


@dataclass
class Node:
    db: Path
    key: NodeKey | None
    port: int
    proc: Proc | None = None
    node_id: int | None = None  # what `flwr supernode register` answered


class Deployment(Started):
    """A server host (:class:`ServerHost`: nginx, SuperLink, SuperExec) and one SuperNode per
    device store on this machine (``with`` block).

    On enter: TLS files, node keys and a publisher key (unless given), this checkout's app
    bundle built and signed, the server host's processes, registration of every node's public
    key (Control API, loopback), the SuperNodes (dialling the proxy, trusting only the publisher
    key), and a wait until all of them are online. On exit, also after an error: every process
    started here is stopped by PID (:func:`stop_processes`).

    ``host``/``port``: the proxy's public address (devices dial it; default 127.0.0.1 and a
    free port); the SuperLink itself is on 127.0.0.1:``superlink_port``."""

    def __init__(self, workdir: str | Path, dbs: Iterable[str | Path], *, host: str = "127.0.0.1",
                 port: int | None = None, superlink_port: int | None = None, hub_port: int | None = None,
                 tls: TLSFiles | None = None, keys: Sequence[NodeKey] | None = None,
                 node_ports: Sequence[int] | None = None, runs_dir: str | Path | None = None,
                 env: Mapping[str, str] | None = None, node_auth: bool = True, online_timeout: float = 120.0,
                 publisher: PublisherKey | None = None, app: SignedApp | None = None) -> None:
        self.workdir = Path(workdir).absolute()
        if not self.workdir.exists():  # private: keys, the SuperLink's state (apps, configs, node keys), logs
            self.workdir.mkdir(parents=True, mode=0o700)
        self.host = host
        self.port = port
        self.superlink_port, self.hub_port = superlink_port, hub_port
        self.tls = tls
        self.node_auth = node_auth
        self.online_timeout = online_timeout
        self.runs_dir_given = runs_dir
        self.env_given = dict(env or {})
        self.publisher, self.app = publisher, app
        dbs = [Path(d).absolute() for d in dbs]
        keys = list(keys) if keys is not None else None
        if keys is not None and len(keys) < len(dbs):
            raise ValueError(f"{len(dbs)} device stores but {len(keys)} node keys")
        ports = list(node_ports) if node_ports else [free_port() for _ in dbs]
        self._keys_given = keys
        self.nodes = [Node(db, None, p) for db, p in zip(dbs, ports)]
        self.server: ServerHost | None = None
        self.extra: list[Proc] = []  # more SuperNodes started with start_supernode()

    # ---- what the tests and the CLI read
    @property
    def address(self) -> str:
        """The public address devices dial (the proxy)."""
        return self._server().address

    @property
    def control_address(self) -> str:
        return self._server().control_address

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "server" / "flwr-home"

    @property
    def runs_dir(self) -> Path:
        return self._server().runs_dir

    @property
    def database(self) -> Path:
        return self._server().database

    @property
    def superlink(self) -> Proc | None:
        return self.server.superlink if self.server else None

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def _server(self) -> ServerHost:
        if self.server is None:
            raise DeployError("the deployment has not been started")
        return self.server

    # ---- lifecycle
    def start(self) -> None:
        if self.tls is None:
            self.tls = make_ca_and_certs(self.workdir / "tls", hosts=list(dict.fromkeys([self.host, *DEFAULT_HOSTS])))
        keys = self._keys_given
        if keys is None and self.node_auth:
            keys = make_node_keys(self.workdir / "keys", len(self.nodes))
        for node, key in zip(self.nodes, keys or [None] * len(self.nodes)):
            node.key = key
        if self.publisher is None:
            self.publisher = make_publisher_key(self.workdir / "publisher")
        if self.app is None:
            self.app = sign_fab(build_fab(self.workdir / "apps"), self.publisher.private)
        self.server = ServerHost(self.workdir / "server", tls=self.tls, app=self.app, public_host=self.host,
                                 public_port=self.port, superlink_port=self.superlink_port, hub_port=self.hub_port,
                                 runs_dir=self.runs_dir_given, env=self.env_given, node_auth=self.node_auth)
        self.server.start()
        if self.node_auth:
            for i, node in enumerate(self.nodes):
                node.node_id = register_node(node.key.public, self.flwr_home, name=f"device-{i + 1}")
        for i, node in enumerate(self.nodes):
            node.proc = self.start_supernode(node.db, node.key, port=node.port, name=f"supernode-{i + 1}",
                                             track=False)
        self.wait_online(len(self.nodes), timeout=self.online_timeout)

    def stop(self) -> None:
        procs = [*self.extra, *(n.proc for n in self.nodes if n.proc is not None)]
        if self.server is not None:
            procs += self.server.processes()
        stop_processes(procs)

    def _env(self, name: str) -> dict[str, str]:
        """The environment of one SuperNode: its own FLWR_HOME (app bundles are unpacked there)."""
        env = {**os.environ, **self.env_given, "FLWR_TELEMETRY_ENABLED": "0",
               "FLWR_HOME": str(self.workdir / "home" / name)}
        env.pop("FLWR_SUPERGRID_API_URL", None)
        return env

    # ---- SuperNodes
    def start_supernode(self, db: str | Path, key: NodeKey | None, *, port: int | None = None,
                        root_certificates: str | Path | None = None, name: str = "supernode",
                        track: bool = True, trusted: bool = True) -> Proc:
        """Start one more SuperNode (tests: an unregistered key, a wrong CA); stopped on exit.
        It dials the proxy and, with ``trusted``, runs only bundles signed by the publisher key."""
        command = supernode_command(superlink=self.address,
                                    root_certificates=root_certificates or self.tls.ca_cert, db=db,
                                    port=port or free_port(), auth_key=key.private if key else None,
                                    trusted_entities=self.publisher.trusted_entities if trusted else None)
        proc = start_process(name, command, self.logs / f"{name}.log", self._env(name), cwd=self.workdir)
        if track:
            self.extra.append(proc)
        return proc

    def wait_online(self, n: int, timeout: float = 120.0) -> list[dict[str, Any]]:
        """Wait until ``n`` SuperNodes are online; a SuperNode that exits fails at once."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if node.proc is not None and not node.proc.alive():
                    raise DeployError(f"{node.proc.name} exited with status {node.proc.popen.returncode}; "
                                      f"its log {node.proc.log} ends:\n{tail(node.proc.log)}")
            online = [row for row in list_nodes(self.flwr_home) if row.get("status") == "online"]
            if len(online) >= n:
                return online
            if time.monotonic() > deadline:
                logs = "\n".join(f"{p.name}: {tail(p.log, 10)}" for p in self._server().processes())
                raise DeployError(f"{len(online)} of {n} SuperNodes online after {timeout:.0f} s; logs:\n{logs}")
            time.sleep(2.0)

    # ---- runs
    def nodes_status(self) -> list[dict[str, Any]]:
        return list_nodes(self.flwr_home)

    def run(self, run_config: Mapping[str, Any] | None = None, *, timeout: float = 600.0,
            check: bool = True) -> RunStatus:
        """``flwr run`` the signed app, wait for the end; its real status (raises unless
        completed when ``check``)."""
        status = self.wait_for_run(self.start_run(run_config), timeout=timeout)
        if check and not status.ok:
            raise DeployError(f"run {status.run_id} ended {status.status}: {status.details}; its log ends:\n"
                              f"{run_log(status.run_id, self.flwr_home)}")
        return status

    def start_run(self, run_config: Mapping[str, Any] | None = None) -> int:
        """``flwr run @fedrec/fedrec==VERSION``: the SuperLink fetches the signed bundle from the hub."""
        work = Path(tempfile.mkdtemp(prefix="run-", dir=self.workdir))
        return start_run(self.app.app_spec, self.flwr_home, run_config=run_config, workdir=work)

    def wait_for_run(self, run_id: int, timeout: float = 600.0) -> RunStatus:
        return wait_for_run(run_id, self.flwr_home, timeout=timeout, busy=lambda: bool(self.serverapp_processes()))

    def stop_run(self, run_id: int) -> None:
        stop_run(run_id, self.flwr_home)

    def serverapp_processes(self) -> list[Any]:
        """The ``flwr-serverapp`` processes of the server host (psutil.Process objects)."""
        return self.server.serverapp_processes() if self.server is not None else []

    def connection_help(self) -> str:
        """How to start a run against this deployment (printed by ``fedrec deploy local``)."""
        return self._server().connection_help()
