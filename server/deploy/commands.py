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
                      auth_key: str | Path | None = None, trusted_entities: str | Path | None = None) -> list[str]:
    """``flower-supernode`` for one device store: exactly what ``fedrec-client join`` runs
    (:func:`client.cli.supernode_command`), its mistakes raised as ValueError."""
    from client.cli import UsageError, supernode_command as join_command

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
