"""Deployment on Flower 1.42's SuperLink/SuperNode runtime: TLS material, SuperNode keys,
the exact commands, and a process manager that starts and stops a whole federation.

What runs where (see docs/DEPLOY.md)::

    server host   flower-superlink   one HTTPS port (Fleet API for SuperNodes, Control API for
                                     `flwr`, Runtime API for the ServerApp), TLS, node auth,
                                     a persistent SQLite state; spawns `flwr-serverapp` per run
                  flwr run / ls      the operator's CLI, talks to the Control API
    device        flower-supernode   dials the SuperLink (TLS checked against ca.crt, signed
                                     with its own P-384 key); spawns `flwr-clientapp` per message

Everything here is plain functions returning paths or argument lists, plus :class:`Deployment`
(used by ``fedrec deploy local`` and tests/test_deploy.py), which starts the processes in
their own sessions, logs each to a file and stops every one of them by PID on exit.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
APP_PARTS = ("pyproject.toml", "README.md", "common", "client", "server")  # what the FAB needs
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CONNECTION = "fedrec"  # the name of the SuperLink connection in $FLWR_HOME/config.toml
FINISHED = "finished"


class DeployError(RuntimeError):
    """A process did not start, a port never opened, or a run did not finish well."""


# ---------------------------------------------------------------- executables
def executable(name: str) -> str:
    """This environment's ``flower-superlink``/``flower-supernode``/``flwr``, even off PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name) or name


# ---------------------------------------------------------------- TLS
@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path  # ca.crt: give it to every SuperNode and to `flwr` (root-certificates)
    server_cert: Path  # server.pem: the SuperLink's certificate, signed by the CA
    server_key: Path  # server.key (0600): the SuperLink's private key
    ca_key: Path | None = None  # ca.key (0600): only to sign new server certificates; keep offline


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (no window in which others can read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca_and_certs(out_dir: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS, *, days: int = 825,
                      ca_name: str = "fedrec CA", write_ca_key: bool = True) -> TLSFiles:
    """A fresh CA (self-signed, CA:TRUE, P-384) and a server certificate (P-256, serverAuth)
    signed by it, valid for every name in ``hosts`` (DNS names and IP addresses as such SANs).

    Writes ``ca.crt``, ``server.pem``, ``server.key`` (0600) and, unless ``write_ca_key`` is
    False, ``ca.key`` (0600) into ``out_dir``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise ValueError("at least one host name or IP address is needed for the server certificate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject).issuer_name(ca_subject)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys(hosts)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    files = TLSFiles(out / "ca.crt", out / "server.pem", out / "server.key", out / "ca.key" if write_ca_key else None)
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    _write_private(files.server_key, server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
    if files.ca_key is not None:
        _write_private(files.ca_key, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return files


# ---------------------------------------------------------------- SuperNode keys
@dataclass(frozen=True)
class NodeKey:
    private: Path  # OpenSSH private key (0600): the SuperNode's --auth-supernode-private-key
    public: Path  # OpenSSH public key (ecdsa-sha2-nistp384 ...): `flwr supernode register` takes it


def make_node_keys(out_dir: str | Path, n: int, *, prefix: str = "node") -> list[NodeKey]:
    """``n`` ECDSA P-384 key pairs ``{prefix}{i}.key`` / ``{prefix}{i}.pub`` (i = 1..n).

    Flower 1.42 reads both in OpenSSH format: the SuperNode with ``load_ssh_private_key``, the
    ``flwr supernode register`` command with ``load_ssh_public_key`` (like ``ssh-keygen -t
    ecdsa -b 384``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if n < 0:
        raise ValueError(f"the number of keys must be >= 0, got n={n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(1, n + 1):
        key = ec.generate_private_key(ec.SECP384R1())
        pair = NodeKey(out / f"{prefix}{i}.key", out / f"{prefix}{i}.pub")
        _write_private(pair.private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                       serialization.NoEncryption()))
        pair.public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                               serialization.PublicFormat.OpenSSH) + b"\n")
        keys.append(pair)
    return keys


# ---------------------------------------------------------------- commands
def superlink_command(tls: TLSFiles, *, database: str | Path, host: str = "127.0.0.1", port: int = 9093,
                      isolation: str = "subprocess", node_auth: bool = True) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication, a persistent SQLite state and no
    run-time ``uv sync`` of app dependencies (the installed fedrec is what runs).

    Flower 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr``) and the Runtime
    API (the ServerApp) over HTTPS on this one ``host:port``."""
    command = [executable("flower-superlink"),
               "--ssl-ca-certfile", str(Path(tls.ca_cert).absolute()),
               "--ssl-certfile", str(Path(tls.server_cert).absolute()),
               "--ssl-keyfile", str(Path(tls.server_key).absolute()),
               "--database", str(Path(database).absolute()),
               "--host", host, "--port", str(port),
               "--isolation", isolation,
               "--disable-runtime-dependency-installation"]
    if node_auth:
        command.append("--enable-supernode-auth")
    return command


def supernode_command(*, superlink: str, root_certificates: str | Path, db: str | Path, port: int,
                      auth_key: str | Path | None = None) -> list[str]:
    """``flower-supernode`` for one device store: exactly what ``fedrec-client join`` runs
    (TLS checked against ``root_certificates``, node-config ``data-path='DB'``, the local
    Runtime API on 127.0.0.1:``port`` -- each SuperNode on a host needs its own)."""
    import argparse

    from client.cli import UsageError, supernode_command as join_command

    args = argparse.Namespace(superlink=superlink, root_certificates=str(root_certificates), db=str(db), port=port,
                              auth_key=None if auth_key is None else str(auth_key))
    try:
        return join_command(args)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def write_flwr_config(flwr_home: str | Path, *, address: str, root_certificates: str | Path,
                      name: str = CONNECTION) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection ``name`` (made the default):
    the Control API ``address``, the CA that signed the SuperLink's certificate, TLS on.

    Flower 1.42's format (``flwr.cli.flower_config``)::

        [superlink]
        default = "fedrec"

        [superlink.fedrec]
        address = "127.0.0.1:9093"
        root-certificates = "/abs/path/ca.crt"   # must be absolute
        insecure = false
    """
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    ca = str(Path(root_certificates).expanduser().absolute())
    text = (f'[superlink]\ndefault = {json.dumps(name)}\n\n'
            f'[superlink.{name}]\naddress = {json.dumps(address)}\nroot-certificates = {json.dumps(ca)}\n'
            f'insecure = false\n')
    path = home / "config.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- processes
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: str | Path, n: int = 30) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


@dataclass
class Proc:
    """A process this module started: its command, its log file and the Popen handle."""

    name: str
    command: list[str]
    log: Path
    popen: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return Path(self.log).read_text(errors="replace") if Path(self.log).is_file() else ""


def start_process(name: str, command: Sequence[str], log: str | Path, env: Mapping[str, str] | None = None,
                  cwd: str | Path | None = None) -> Proc:
    """Start ``command`` in its own session (signals to this process leave it alone), with
    stdout and stderr appended to ``log``."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        popen = subprocess.Popen(list(command), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
    return Proc(name, list(command), log, popen)


def stop_processes(procs: Sequence[Proc], timeout: float = 10.0) -> None:
    """Stop ``procs`` and every process they started, each by its PID: SIGTERM to all of them
    at once, then SIGKILL for whatever is still there after ``timeout`` seconds.

    Descendants are found through the process tree and, when their parent already exited
    (orphans), through the process group each of ``procs`` was started in (its own session:
    process group id = its PID)."""
    import psutil

    groups = {proc.pid for proc in procs}

    def family() -> dict[int, psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for proc in procs:
            try:
                root = psutil.Process(proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and p.pid not in found and os.getpgid(p.pid) in groups:
                    found[p.pid] = p
            except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                pass
        return found

    def send(members: Iterable[psutil.Process], sig: int) -> None:
        for p in members:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def wait_dead(members: Iterable[psutil.Process], limit: float) -> list[psutil.Process]:
        """Those still running after ``limit`` s; a zombie (dead, parent yet to reap) counts as dead."""
        pending = list(members)
        deadline = time.monotonic() + limit
        while pending:
            for proc in procs:
                proc.popen.poll()  # reap our own children as they exit
            still = []
            for p in pending:
                try:
                    if p.status() != psutil.STATUS_ZOMBIE:
                        still.append(p)
                except psutil.NoSuchProcess:
                    pass
            pending = still
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        return pending

    members = family()
    send(members.values(), signal.SIGTERM)
    alive = wait_dead(members.values(), timeout)
    rest = {p.pid: p for p in alive}
    rest.update({pid: p for pid, p in family().items() if pid not in members})  # spawned while stopping
    if rest:
        send(rest.values(), signal.SIGKILL)
        wait_dead(rest.values(), 5.0)
    for proc in procs:
        try:
            proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:  # cannot happen after SIGKILL; keep the reaper honest
            pass


def stop_process(proc: Proc, timeout: float = 10.0) -> None:
    """:func:`stop_processes` for one process (and everything it started)."""
    stop_processes([proc], timeout)


def wait_for_port(proc: Proc, host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise DeployError(f"{proc.name} exited with status {proc.popen.returncode} before opening "
                              f"{host}:{port}; its log {proc.log} ends:\n{tail(proc.log)}")
        if port_open(host, port):
            return
        time.sleep(0.3)
    raise DeployError(f"{proc.name} did not open {host}:{port} within {timeout:.0f} s; its log {proc.log} ends:\n"
                      f"{tail(proc.log)}")


# ---------------------------------------------------------------- the app copy and run configs
def copy_app(dest: str | Path, source: str | Path = PROJECT_ROOT) -> Path:
    """A copy of the Flower app (pyproject.toml, common/, client/, server/) for ``flwr run``.

    ``flwr run`` builds its FAB from every matching file under the directory it is given, and
    rewrites ``pyproject.toml`` when it finds a legacy ``[tool.flwr.federations]`` table: a
    small private copy keeps the FAB small and the working tree untouched."""
    dest, source = Path(dest), Path(source)
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in APP_PARTS:
        src = source / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=ignore, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dest / part)
    return dest


def write_run_config(path: str | Path, overrides: Mapping[str, Any]) -> Path:
    """A TOML file of run-config overrides for ``flwr run --run-config FILE.toml`` (flat
    ``section.key`` names, checked against RunConfig first so a typo fails here, by name)."""
    import tomli_w

    from common.config import RunConfig

    flat = RunConfig.from_flat(dict(overrides)).to_flat()  # unknown key, wrong type, out of range: raises now
    typed = {key: flat[key] for key in overrides}  # "0.5" -> 0.5, 1 -> 1.0 for a float key, ...
    path = Path(path)
    path.write_text(tomli_w.dumps(typed))
    return path


# ---------------------------------------------------------------- flwr CLI
@dataclass(frozen=True)
class RunStatus:
    run_id: int
    status: str  # Flower's "finished:completed", "finished:failed", "finished:stopped", "running", ...
    details: str
    seconds: float

    @property
    def finished(self) -> bool:
        return self.status.startswith(FINISHED)

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def flwr_cli(args: Sequence[str], *, flwr_home: str | Path, timeout: float = 120.0,
             check: bool = True, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "NO_COLOR": "1",
           "COLUMNS": "200", "TERM": "dumb"}
    result = subprocess.run([executable("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=cwd, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise DeployError(f"flwr {' '.join(args)} exited with status {result.returncode}:\n"
                          f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result


def _json_out(result: subprocess.CompletedProcess) -> dict[str, Any]:
    """The JSON document ``flwr ... --format json`` prints (other lines may precede it)."""
    text = result.stdout
    decoder = json.JSONDecoder()
    offset = 0
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("{"):
            try:
                return decoder.raw_decode(text, offset + line.index("{"))[0]
            except json.JSONDecodeError:
                pass
        offset += len(line)
    raise DeployError(f"no JSON in the output of flwr:\n{text[-2000:]}{result.stderr[-2000:]}")


def list_nodes(flwr_home: str | Path, connection: str = CONNECTION) -> list[dict[str, Any]]:
    """``flwr supernode ls --format json``: one dict per node (node-id, status, ...)."""
    out = _json_out(flwr_cli(["supernode", "ls", connection, "--format", "json", "-v"], flwr_home=flwr_home))
    return list(out.get("nodes", []))


def list_runs(flwr_home: str | Path, connection: str = CONNECTION, run_id: int | None = None) -> list[dict[str, Any]]:
    args = ["ls", connection, "--format", "json"] + (["--run-id", str(run_id)] if run_id is not None else [])
    return list(_json_out(flwr_cli(args, flwr_home=flwr_home)).get("runs", []))


def register_node(public_key: str | Path, flwr_home: str | Path, connection: str = CONNECTION,
                  name: str | None = None) -> int:
    """``flwr supernode register KEY.pub CONN``: the node id the SuperLink gave the key."""
    args = ["supernode", "register", str(public_key), connection, "--format", "json"]
    if name:
        args += ["--name", name]
    return int(_json_out(flwr_cli(args, flwr_home=flwr_home))["node-id"])


def start_run(app_dir: str | Path, flwr_home: str | Path, *, run_config: Mapping[str, Any] | None = None,
              connection: str = CONNECTION, workdir: str | Path | None = None) -> int:
    """``flwr run APP CONN --run-config OVERRIDES.toml``: returns the run id (the run goes on
    in the SuperLink; ``flwr run`` itself returns at once and exits 0 even if it later fails)."""
    args = ["run", str(app_dir), connection, "--format", "json"]
    if run_config:
        where = Path(workdir or tempfile.mkdtemp(prefix="fedrec-runcfg-"))
        args += ["--run-config", str(write_run_config(where / f"run-config-{time.time_ns()}.toml", run_config))]
    out = _json_out(flwr_cli(args, flwr_home=flwr_home, timeout=300))
    if not out.get("success") or not out.get("run-id"):
        raise DeployError(f"flwr run did not start a run: {out}")
    return int(out["run-id"])


def wait_for_run(run_id: int, flwr_home: str | Path, *, connection: str = CONNECTION, timeout: float = 600.0,
                 poll: float = 5.0, busy: Callable[[], bool] | None = None, quiet: float = 30.0) -> RunStatus:
    """Poll ``flwr ls --run-id`` until the run is finished; its real status.

    Each ``flwr`` call is a new Python process (~1 CPU-second): while ``busy()`` says the run
    is visibly still going (a local ServerApp process is alive), it is asked only every
    ``quiet`` seconds."""
    t0 = time.monotonic()
    last_ls = -float("inf")
    status = "unknown"
    while True:
        interval = quiet if busy is not None and busy() else poll
        if time.monotonic() - last_ls >= interval:
            last_ls = time.monotonic()
            runs = list_runs(flwr_home, connection, run_id)
            row = next((r for r in runs if int(r["run-id"]) == run_id), None)
            status = str(row["status"]) if row is not None else "unknown"
            if status.startswith(FINISHED):
                return RunStatus(run_id, status, str(row.get("status-details") or ""), time.monotonic() - t0)
        if time.monotonic() - t0 > timeout:
            raise DeployError(f"run {run_id} not finished after {timeout:.0f} s (status {status})")
        time.sleep(poll if busy is None else 1.0)  # busy() is a cheap local check


def run_log(run_id: int, flwr_home: str | Path, connection: str = CONNECTION, lines: int = 40) -> str:
    """The last ``lines`` of the run's ServerApp log (``flwr log RUN_ID CONN --show``)."""
    result = flwr_cli(["log", str(run_id), connection, "--show"], flwr_home=flwr_home, check=False)
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


def stop_run(run_id: int, flwr_home: str | Path, connection: str = CONNECTION) -> None:
    """``flwr stop RUN_ID CONN``."""
    flwr_cli(["stop", str(run_id), connection], flwr_home=flwr_home)


def run_and_wait(flwr_home: str | Path, *, run_config: Mapping[str, Any] | None = None, connection: str = CONNECTION,
                 app_dir: str | Path | None = None, timeout: float = 600.0, check: bool = True,
                 workdir: str | Path | None = None) -> RunStatus:
    """Copy the app, ``flwr run`` it, wait for the end and return the real status; with
    ``check`` a run that did not complete raises :class:`DeployError` with Flower's details."""
    work = Path(workdir or tempfile.mkdtemp(prefix="fedrec-run-"))
    app = copy_app(work / "fedrec") if app_dir is None else Path(app_dir)
    run_id = start_run(app, flwr_home, run_config=run_config, connection=connection, workdir=work)
    status = wait_for_run(run_id, flwr_home, connection=connection, timeout=timeout)
    if check and not status.ok:
        raise DeployError(f"run {run_id} ended {status.status}: {status.details}; its log ends:\n"
                          f"{run_log(run_id, flwr_home, connection)}")
    return status


# ---------------------------------------------------------------- a whole federation
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


# ---------------------------------------------------------------- the item catalogue
def write_catalog(out: str | Path, *, source: str = "ml-100k", fmt: str = "auto", item_file: str = "") -> Path:
    """``items.csv`` (item_id,title; one row per model row) for ``source``: exactly the file
    every run directory publishes, available before the first run so devices can import it
    (``fedrec-client import --items items.csv``) and join."""
    from client.store import write_items_file
    from common.config import RunConfig
    from server.app import load_catalog

    cfg = RunConfig.from_flat({"data.source": source, "data.format": fmt, "data.item-file": item_file})
    ids, titles = load_catalog(cfg)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_items_file(out, ids, titles)
    return out
