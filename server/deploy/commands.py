"""The exact command lines of Flower's processes and the ``flwr`` CLI's connection file."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from server.deploy.pki import TLSFiles

CONNECTION = "fedrec"  # the name of the SuperLink connection in $FLWR_HOME/config.toml


def executable(name: str) -> str:
    """This environment's ``flower-superlink``/``flower-supernode``/``flwr``, even off PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name) or name


SUPERLINK_PORT = 9091  # on 127.0.0.1 only: Fleet, Control and Runtime API of the SuperLink
PUBLIC_PORT = 9093  # the proxy's public port: the Fleet API, what devices dial
HUB_PORT = 9099  # on 127.0.0.1 only: the app hub the SuperLink fetches signed app bundles from


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def superlink_command(tls: TLSFiles, *, database: str | Path, secret_file: str | Path, host: str = "127.0.0.1",
                      port: int = SUPERLINK_PORT, node_auth: bool = True) -> list[str]:
    """``flower-superlink`` on a loopback address, with TLS, SuperNode authentication, a
    persistent SQLite state, no run-time ``uv sync`` of app dependencies (the installed fedrec
    is what runs), and ``process`` isolation with a SuperExec secret: the Runtime API then hands
    tasks (AcquireTask) only to a SuperExec that signs its calls with ``secret_file``
    (:func:`superexec_command`). In ``subprocess`` isolation Flower 1.42 ignores the secret.

    Flower 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr``) and the Runtime
    API (ServerApp, SuperExec) on this one ``host:port``; the Control API authenticates nobody
    without OIDC, so ``host`` must be a loopback address and the proxy publishes the Fleet API
    (:mod:`server.deploy.proxy`)."""
    if not _is_loopback(host):
        raise ValueError(f"the SuperLink listens on {host!r}: it must be a loopback address (its port also serves "
                         "the unauthenticated Control API); the proxy publishes the Fleet API")
    command = [executable("flower-superlink"),
               "--ssl-ca-certfile", str(Path(tls.ca_cert).absolute()),
               "--ssl-certfile", str(Path(tls.server_cert).absolute()),
               "--ssl-keyfile", str(Path(tls.server_key).absolute()),
               "--database", str(Path(database).absolute()),
               "--host", host, "--port", str(port),
               "--isolation", "process",
               "--superexec-auth-secret-file", str(Path(secret_file).absolute()),
               "--disable-runtime-dependency-installation"]
    if node_auth:
        command.append("--enable-supernode-auth")
    return command


def superexec_command(*, runtime_address: str, root_certificates: str | Path, secret_file: str | Path) -> list[str]:
    """``flower-superexec`` for the SuperLink's ServerApps: it acquires their tasks from the
    Runtime API at ``runtime_address`` (TLS checked against ``root_certificates``), signing its
    calls with ``secret_file``, and starts one ``flwr-serverapp`` per run; no run-time
    dependency installation."""
    return [executable("flower-superexec"), "--runtime-api-address", runtime_address,
            "--root-certificates", str(Path(root_certificates).absolute()),
            "--superexec-auth-secret-file", str(Path(secret_file).absolute())]


def write_secret(path: str | Path, nbytes: int = 32) -> Path:
    """A fresh random SuperExec secret (hex text, 0600), shared by the SuperLink and its SuperExec."""
    import secrets

    from server.deploy.pki import write_private

    path = Path(path)
    write_private(path, secrets.token_hex(nbytes).encode("ascii"))
    return path


def supernode_command(*, superlink: str, root_certificates: str | Path, db: str | Path, port: int,
                      auth_key: str | Path | None = None, trusted_entities: str | Path | None = None) -> list[str]:
    """``flower-supernode`` for one device store: exactly what ``fedrec-client join`` runs
    (:func:`client.cli.supernode_command`), its mistakes raised as ValueError."""
    from client.cli import supernode_command as join_command
    from common.cli import UsageError

    try:
        return join_command(superlink=superlink, root_certificates=root_certificates, db=db, port=port,
                            auth_key=auth_key, trusted_entities=trusted_entities)
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
        address = "127.0.0.1:9091"
        root-certificates = "/abs/path/ca.crt"   # must be absolute
        insecure = false
    """
    from server.deploy.pki import write_private

    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = str(Path(root_certificates).expanduser().absolute())
    text = (f'[superlink]\ndefault = {json.dumps(name)}\n\n'
            f'[superlink.{name}]\naddress = {json.dumps(address)}\nroot-certificates = {json.dumps(ca)}\n'
            f'insecure = false\n')
    path = home / "config.toml"
    write_private(path, text.encode())
    return path
