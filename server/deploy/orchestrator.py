"""A whole federation on this machine: :class:`Deployment` (``fedrec deploy local``, tests)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.deploy.commands import CONNECTION, superlink_command, supernode_command, write_flwr_config
from server.deploy.errors import DeployError
from server.deploy.flwr_cli import (
    PROJECT_ROOT,
    RunStatus,
    copy_app,
    list_nodes,
    register_node,
    run_log,
    start_run,
    stop_run,
    wait_for_run,
)
from server.deploy.pki import DEFAULT_HOSTS, NodeKey, TLSFiles, make_ca_and_certs, make_node_keys
from server.deploy.processes import Proc, free_port, start_process, stop_processes, tail, wait_for_port


@dataclass
class Node:
    db: Path
    key: NodeKey | None
    port: int
    proc: Proc | None = None
    node_id: int | None = None  # what `flwr supernode register` answered


class Deployment:
    """A SuperLink and one SuperNode per device store on this machine (``with`` block).

    On enter: TLS files and node keys (unless given), ``$FLWR_HOME/config.toml``, the
    SuperLink (TLS, node auth, SQLite state), registration of every node's public key, the
    SuperNodes, and a wait until all of them are online. On exit, also after an error: every
    process started here is stopped by PID (:func:`stop_processes`)."""

    def __init__(self, workdir: str | Path, dbs: Iterable[str | Path], *, host: str = "127.0.0.1",
                 port: int | None = None, tls: TLSFiles | None = None, keys: Sequence[NodeKey] | None = None,
                 node_ports: Sequence[int] | None = None, runs_dir: str | Path | None = None,
                 env: Mapping[str, str] | None = None, node_auth: bool = True, online_timeout: float = 120.0) -> None:
        self.workdir = Path(workdir).absolute()
        if not self.workdir.exists():  # private: keys, the SuperLink's state (apps, configs, node keys), logs
            self.workdir.mkdir(parents=True, mode=0o700)
        self.host = host
        self.port = port or free_port(host)
        self.address = f"{host}:{self.port}"
        self.tls = tls
        self.node_auth = node_auth
        self.online_timeout = online_timeout
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.database = self.workdir / "superlink.sqlite"
        self.runs_dir = Path(runs_dir).absolute() if runs_dir else self.workdir / "runs"
        self.env = {**os.environ, **(env or {}), "FLWR_TELEMETRY_ENABLED": "0", "FEDREC_RUNS": str(self.runs_dir)}
        self.env.pop("FLWR_HOME", None)  # each process gets its own (where it unpacks app bundles)
        dbs = [Path(d).absolute() for d in dbs]
        keys = list(keys) if keys is not None else None
        if keys is not None and len(keys) < len(dbs):
            raise ValueError(f"{len(dbs)} device stores but {len(keys)} node keys")
        ports = list(node_ports) if node_ports else [free_port() for _ in dbs]
        self._keys_given = keys
        self.nodes = [Node(db, None, p) for db, p in zip(dbs, ports)]
        self.superlink: Proc | None = None
        self.extra: list[Proc] = []  # more SuperNodes started with start_supernode()

    # ---- lifecycle
    def __enter__(self) -> "Deployment":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.tls is None:
            self.tls = make_ca_and_certs(self.workdir / "tls", hosts=sorted({self.host, *DEFAULT_HOSTS}))
        keys = self._keys_given
        if keys is None and self.node_auth:
            keys = make_node_keys(self.workdir / "keys", len(self.nodes))
        for node, key in zip(self.nodes, keys or [None] * len(self.nodes)):
            node.key = key
        write_flwr_config(self.flwr_home, address=self.address, root_certificates=self.tls.ca_cert)
        if not self.database.exists():  # SQLite keeps these permissions (also for -wal and -shm)
            os.close(os.open(self.database, os.O_CREAT | os.O_WRONLY, 0o600))
        command = superlink_command(self.tls, database=self.database, host=self.host, port=self.port,
                                    node_auth=self.node_auth)
        self.superlink = start_process("superlink", command, self.logs / "superlink.log", self._env("superlink"),
                                       cwd=self.workdir)
        wait_for_port(self.superlink, self.host, self.port, timeout=90)
        if self.node_auth:
            for i, node in enumerate(self.nodes):
                node.node_id = register_node(node.key.public, self.flwr_home, name=f"device-{i + 1}")
        for i, node in enumerate(self.nodes):
            node.proc = self.start_supernode(node.db, node.key, port=node.port, name=f"supernode-{i + 1}",
                                             track=False)
        self.wait_online(len(self.nodes), timeout=self.online_timeout)

    def stop(self) -> None:
        procs = [*self.extra, *(n.proc for n in self.nodes if n.proc is not None)]
        if self.superlink is not None:
            procs.append(self.superlink)
        stop_processes(procs)

    def _env(self, name: str) -> dict[str, str]:
        """The environment of one process: its own FLWR_HOME (app bundles are unpacked there)."""
        return {**self.env, "FLWR_HOME": str(self.workdir / "home" / name)}

    # ---- SuperNodes
    def start_supernode(self, db: str | Path, key: NodeKey | None, *, port: int | None = None,
                        root_certificates: str | Path | None = None, name: str = "supernode",
                        track: bool = True) -> Proc:
        """Start one more SuperNode (tests: an unregistered key, a wrong CA); stopped on exit."""
        command = supernode_command(superlink=self.address,
                                    root_certificates=root_certificates or self.tls.ca_cert, db=db,
                                    port=port or free_port(), auth_key=key.private if key else None)
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
                raise DeployError(f"{len(online)} of {n} SuperNodes online after {timeout:.0f} s; SuperLink log:\n"
                                  f"{tail(self.superlink.log) if self.superlink else ''}")
            time.sleep(2.0)

    # ---- runs
    def nodes_status(self) -> list[dict[str, Any]]:
        return list_nodes(self.flwr_home)

    def run(self, run_config: Mapping[str, Any] | None = None, *, timeout: float = 600.0,
            check: bool = True) -> RunStatus:
        """``flwr run`` a copy of the app, wait for the end; its real status (raises unless
        completed when ``check``)."""
        status = self.wait_for_run(self.start_run(run_config), timeout=timeout)
        if check and not status.ok:
            raise DeployError(f"run {status.run_id} ended {status.status}: {status.details}; its log ends:\n"
                              f"{run_log(status.run_id, self.flwr_home)}")
        return status

    def start_run(self, run_config: Mapping[str, Any] | None = None) -> int:
        work = Path(tempfile.mkdtemp(prefix="run-", dir=self.workdir))
        return start_run(copy_app(work / "fedrec"), self.flwr_home, run_config=run_config, workdir=work)

    def wait_for_run(self, run_id: int, timeout: float = 600.0) -> RunStatus:
        return wait_for_run(run_id, self.flwr_home, timeout=timeout, busy=lambda: bool(self.serverapp_processes()))

    def stop_run(self, run_id: int) -> None:
        stop_run(run_id, self.flwr_home)

    def serverapp_processes(self) -> list[Any]:
        """The ``flwr-serverapp`` processes the SuperLink started (psutil.Process objects)."""
        import psutil

        if self.superlink is None or not self.superlink.alive():
            return []
        out = []
        for child in psutil.Process(self.superlink.pid).children(recursive=True):
            try:
                if any(Path(part).name == "flwr-serverapp" for part in child.cmdline()[:2]):
                    out.append(child)
            except psutil.NoSuchProcess:
                pass
        return out

    def connection_help(self) -> str:
        """How to start a run against this deployment (printed by ``fedrec deploy local``)."""
        return (f"FLWR_HOME={self.flwr_home} flwr run {PROJECT_ROOT} {CONNECTION} "
                f"--run-config 'fed.rounds=3 fed.sample-rate=1.0'\n"
                f"FLWR_HOME={self.flwr_home} flwr ls {CONNECTION}\n"
                f"FLWR_HOME={self.flwr_home} flwr supernode ls {CONNECTION}")
