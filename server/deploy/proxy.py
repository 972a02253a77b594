"""The public face of the server host: nginx (Debian's package), the only process that listens
beyond loopback.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr``: register keys, list
nodes, start runs, read logs) and the Runtime API (ServerApp, SuperExec) on one port, and the
Control API authenticates nobody without OIDC. So the SuperLink listens on 127.0.0.1 and nginx
publishes exactly the Fleet API calls a SuperNode makes (:data:`FLEET_PATHS`, POST only) on the
public address, TLS on both legs (the SuperLink's certificate checked against ca.crt);
everything else gets 404 from nginx and never reaches the SuperLink.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from server.deploy.errors import DeployError
from server.deploy.pki import TLSFiles, write_private

# Every call of Flower 1.42's SuperNode (flwr.supernode.fleet_http_client.FleetHttpClient);
# tests/test_deploy_proxy.py checks this against Flower's Fleet router.
FLEET_PATHS = (
    "/v1/fleet/register-node", "/v1/fleet/activate-node", "/v1/fleet/deactivate-node",
    "/v1/fleet/unregister-node", "/v1/fleet/send-node-heartbeat", "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages", "/v1/fleet/get-run", "/v1/fleet/get-fab", "/v1/fleet/push-object",
    "/v1/fleet/pull-object", "/v1/fleet/confirm-message-received",
)
MAX_BODY = "512m"  # Flower's own message limit (GRPC_MAX_MESSAGE_LENGTH)


def nginx_executable() -> str:
    """Debian's nginx (``apt-get install -y nginx``)."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if Path(p).is_file()), None)
    if found is None:
        raise DeployError("nginx not found: the public port is an nginx reverse proxy; install it "
                          "(Debian/Ubuntu: apt-get install -y nginx)")
    return found


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class ProxyFiles:
    config: Path  # nginx.conf
    prefix: Path  # nginx's -p directory: pid file, temp directories
    access_log: Path


def write_nginx_config(directory: str | Path, *, tls: TLSFiles, public_host: str, public_port: int,
                       superlink_port: int) -> ProxyFiles:
    """``nginx.conf`` for :func:`nginx_command`: the Fleet API of the SuperLink on
    127.0.0.1:``superlink_port`` published on ``public_host:public_port``. nginx runs in the
    foreground (``daemon off``), logs errors to its stderr and requests to ``access.log``;
    request and response bodies stream through (no temporary files)."""
    base = Path(directory).absolute()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    for sub in ("tmp", "logs"):
        (base / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    access_log = base / "logs" / "access.log"
    temps = "\n".join(f"    {kind}_temp_path {base / 'tmp' / kind};" for kind in
                      ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    fleet = "|".join(p.rsplit("/", 1)[1] for p in FLEET_PATHS)
    text = f"""# Written by fedrec (server/deploy/proxy.py); regenerated on every start.
daemon off;
worker_processes 1;
pid {base / 'nginx.pid'};
error_log stderr notice;
events {{ worker_connections 512; }}

http {{
    access_log {access_log};
    server_tokens off;
{temps}
    client_max_body_size {MAX_BODY};

    upstream superlink {{
        server {_listen('127.0.0.1', superlink_port)};
        keepalive 16;
    }}

    # The public port: the Fleet API calls of a SuperNode, nothing else.
    server {{
        listen {_listen(public_host, public_port)} ssl;
        ssl_certificate {Path(tls.server_cert).absolute()};
        ssl_certificate_key {Path(tls.server_key).absolute()};
        ssl_protocols TLSv1.2 TLSv1.3;

        location ~ "^/v1/fleet/({fleet})$" {{
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {Path(tls.ca_cert).absolute()};
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
        location / {{ return 404; }}
    }}
}}
"""
    config = base / "nginx.conf"
    write_private(config, text.encode())
    return ProxyFiles(config, base, access_log)


def nginx_command(files: ProxyFiles) -> list[str]:
    """nginx in the foreground with this configuration (``-t`` first: :func:`check_config`)."""
    return [nginx_executable(), "-p", str(files.prefix), "-c", str(files.config)]


def check_config(files: ProxyFiles) -> None:
    """``nginx -t``: a configuration nginx refuses raises DeployError with nginx's words."""
    import subprocess

    result = subprocess.run([*nginx_command(files), "-t"], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, umask=0o077)  # it creates the log files
    if result.returncode != 0:
        raise DeployError(f"nginx refused {files.config}:\n{result.stderr[-2000:]}")
