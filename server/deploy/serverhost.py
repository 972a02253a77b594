"""The server host's processes: :class:`ServerHost` (``fedrec deploy server``, and the server
side of ``fedrec deploy local``).

::

    public_host:9093  nginx (HTTPS)  --- the Fleet API calls only --->  127.0.0.1:9091 flower-superlink
    127.0.0.1:9099    the app hub (server.deploy.hub):           (Fleet, Control, Runtime API;
                      the one signed FAB, for the SuperLink        --isolation process)
                      flower-superexec (SuperExec secret) --- AcquireTask --->  Runtime API
                        └─ flwr-serverapp   one per run: server.app:app, writes the run directory

Every process starts with umask 077 (state, logs, run directories: 0600 files, 0700 dirs).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server.deploy.commands import (
    CONNECTION,
    superexec_command,
    superlink_command,
    write_flwr_config,
    write_secret,
)
from server.deploy.pki import TLSFiles, validate_host
from server.deploy.processes import Proc, Started, free_port, start_process, stop_processes, wait_for_port
from server.deploy.proxy import ProxyFiles, check_config, nginx_command, write_nginx_config
from server.deploy.signing import SignedApp


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ServerHost(Started):
    """nginx, the SuperLink, its SuperExec and the app hub, started by :meth:`start`, stopped by PID by
    :meth:`stop` (also as a ``with`` block). Ports left as None get free ones (tests)."""

    def __init__(self, workdir: str | Path, *, tls: TLSFiles, app: SignedApp, public_host: str = "127.0.0.1",
                 public_port: int | None = None, superlink_port: int | None = None, hub_port: int | None = None,
                 runs_dir: str | Path | None = None, env: Mapping[str, str] | None = None,
                 node_auth: bool = True) -> None:
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tls, self.app, self.node_auth = tls, app, node_auth
        self.public_host = validate_host(public_host)
        self.public_port = public_port or free_port(self.public_host)
        self.superlink_port = superlink_port or free_port()
        self.hub_port = hub_port or free_port()
        self.address = host_port(self.public_host, self.public_port)  # what devices dial: the proxy
        self.control_address = host_port("127.0.0.1", self.superlink_port)  # flwr and the SuperExec: loopback
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.database = self.workdir / "superlink.sqlite"
        self.secret = self.workdir / "superexec.secret"
        self.runs_dir = Path(runs_dir).absolute() if runs_dir else self.workdir / "runs"
        self.env = {**os.environ, **(env or {}), "FLWR_TELEMETRY_ENABLED": "0", "FEDREC_RUNS": str(self.runs_dir),
                    # the SuperLink fetches `flwr run @publisher/app==x.y.z` bundles, with their signatures, here
                    "FLWR_SUPERGRID_API_URL": f"http://127.0.0.1:{self.hub_port}/v1"}
        self.env.pop("FLWR_HOME", None)  # each process gets its own (where it unpacks app bundles)
        self.proxy_files: ProxyFiles | None = None
        self.superlink: Proc | None = None
        self.superexec: Proc | None = None
        self.proxy: Proc | None = None
        self.hub: Proc | None = None

    def _env(self, name: str) -> dict[str, str]:
        return {**self.env, "FLWR_HOME": str(self.workdir / "home" / name)}

    def start(self) -> None:
        write_secret(self.secret)  # a new one on every start: only this SuperExec knows it
        write_flwr_config(self.flwr_home, address=self.control_address, root_certificates=self.tls.ca_cert)
        self.runs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.database.exists():
            os.close(os.open(self.database, os.O_CREAT | os.O_WRONLY, 0o600))
        self.proxy_files = write_nginx_config(self.workdir / "nginx", tls=self.tls, public_host=self.public_host,
                                              public_port=self.public_port, superlink_port=self.superlink_port)
        check_config(self.proxy_files)
        self.superlink = start_process(
            "superlink", superlink_command(self.tls, database=self.database, secret_file=self.secret,
                                           port=self.superlink_port, node_auth=self.node_auth),
            self.logs / "superlink.log", self._env("superlink"), cwd=self.workdir)
        wait_for_port(self.superlink, "127.0.0.1", self.superlink_port, timeout=90)
        self.superexec = start_process(
            "superexec", superexec_command(runtime_address=self.control_address, root_certificates=self.tls.ca_cert,
                                           secret_file=self.secret),
            self.logs / "superexec.log", self._env("superexec"), cwd=self.workdir)
        self.proxy = start_process("nginx", nginx_command(self.proxy_files), self.logs / "nginx.log",
                                   self._env("nginx"), cwd=self.workdir)
        self.hub = start_process("hub", [sys.executable, "-m", "server.deploy.hub", "--port", str(self.hub_port),
                                         "--app-dir", str(self.app.fab.parent), "--app-spec", self.app.app_spec],
                                 self.logs / "hub.log", self._env("hub"), cwd=self.workdir)
        wait_for_port(self.proxy, self.public_host, self.public_port, timeout=30)
        wait_for_port(self.hub, "127.0.0.1", self.hub_port, timeout=30)

    def processes(self) -> list[Proc]:
        return [p for p in (self.proxy, self.hub, self.superexec, self.superlink) if p is not None]

    def stop(self) -> None:
        stop_processes(self.processes())

    def serverapp_processes(self) -> list[Any]:
        """The ``flwr-serverapp`` processes the SuperExec started (psutil.Process objects)."""
        import psutil

        out = []
        for parent in (self.superexec, self.superlink):
            if parent is None or not parent.alive():
                continue
            for child in psutil.Process(parent.pid).children(recursive=True):
                try:
                    if any(Path(part).name == "flwr-serverapp" for part in child.cmdline()[:2]):
                        out.append(child)
                except psutil.NoSuchProcess:
                    pass
        return out

    def connection_help(self) -> str:
        """How to start a run against this server (printed by ``fedrec deploy server|local``)."""
        home = f"FLWR_HOME={self.flwr_home}"
        return (f"{home} flwr run {self.app.app_spec} {CONNECTION} --run-config 'fed.rounds=3 fed.sample-rate=1.0'\n"
                f"{home} flwr ls {CONNECTION}\n"
                f"{home} flwr supernode register DEVICE.pub {CONNECTION}\n"
                f"{home} flwr supernode ls {CONNECTION}")
