"""The server host's guards (issue #12, finding 1), piece by piece, against Flower's own code:

- the proxy forwards exactly the Fleet API calls of Flower 1.42's SuperNode, POST only; a real
  nginx in front of a recording HTTPS server shows nothing else ever reaches the upstream (slow:
  needs Debian's nginx, which .ci/run installs);
- a bundle signed with the publisher key passes the SuperNode's own check
  (``flwr.supernode.start_client_internal._verify_fab``), a changed bundle or another key does not;
- the app hub answers the SuperLink's own request (``request_download_link``) on loopback.

Network traffic: 127.0.0.0/8 only.
"""

from __future__ import annotations

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from server import deploy
from server.deploy import hub, proxy, signing

slow = pytest.mark.slow


def test_the_proxy_allowlist_is_every_fleet_call_of_flowers_supernode():
    from flwr.superlink.routers.fleet.router import router

    assert {route.path for route in router.routes} == set(proxy.FLEET_PATHS)
    assert all(route.methods == {"POST"} for route in router.routes)


def _signed(tmp_path: Path, content: bytes = b"PK\x05\x06" + bytes(18)) -> tuple[signing.SignedApp,
                                                                                 signing.PublisherKey]:
    key = signing.make_publisher_key(tmp_path / "publisher")
    fab = tmp_path / "apps" / "fedrec.fedrec.0-1-0.abcd.fab"
    fab.parent.mkdir()
    fab.write_bytes(content)
    return signing.sign_fab(fab, key.private, spec="@fedrec/fedrec==0.1.0"), key


def _flower_accepts(app_fab: bytes, verifications: list[dict], trusted_yaml: Path) -> bool:
    """The SuperNode's own check of a bundle the SuperLink fetched from a hub."""
    import hashlib

    import yaml
    from flwr.supercore.fab import Fab
    from flwr.superlink.servicer.control.control_handlers import _format_verification
    from flwr.supernode.start_client_internal import _verify_fab

    fab = Fab(hashlib.sha256(app_fab).hexdigest(), app_fab, _format_verification(verifications))
    return bool(fab.verifications.get("valid_license")) and _verify_fab(fab, yaml.safe_load(trusted_yaml.read_text()))


def test_a_signed_bundle_passes_flowers_check_and_a_changed_one_or_another_key_does_not(tmp_path):
    app, key = _signed(tmp_path)
    assert key.private.stat().st_mode & 0o777 == 0o600
    content = app.fab.read_bytes()
    assert _flower_accepts(content, app.verifications(), key.trusted_entities)
    assert not _flower_accepts(content + b"\n# evil", app.verifications(), key.trusted_entities)
    other = signing.make_publisher_key(tmp_path / "other")
    assert not _flower_accepts(content, app.verifications(), other.trusted_entities)
    with pytest.raises(ValueError, match="Ed25519"):
        signing.sign_fab(app.fab, deploy.make_node_keys(tmp_path / "k", 1)[0].private)  # a P-384 node key


def test_fedrec_deploy_sign_builds_this_checkout_and_flower_accepts_the_signature(tmp_path, capsys):
    from server.cli import main

    assert main(["deploy", "app-key", "--out", str(tmp_path / "publisher")]) == 0
    assert main(["deploy", "app-key", "--out", str(tmp_path / "publisher")]) == 2  # no silent overwrite
    assert main(["deploy", "sign", "--key", str(tmp_path / "publisher" / "publisher.key"),
                 "--out", str(tmp_path / "signed")]) == 0
    assert "@fedrec/fedrec==" in capsys.readouterr().out
    app = signing.load_signed_app(tmp_path / "signed")
    assert app.app_spec == signing.app_spec()  # read from the bundle itself
    assert _flower_accepts(app.fab.read_bytes(), app.verifications(), tmp_path / "publisher" / "trusted-entities.yaml")
    assert main(["deploy", "sign", "--key", str(tmp_path / "none.key"), "--out", str(tmp_path / "signed")]) == 2


def test_the_hub_answers_the_superlinks_request_on_loopback_only(tmp_path):
    import requests
    from flwr.supercore.utils import request_download_link

    app, _ = _signed(tmp_path)
    with pytest.raises(ValueError, match="loopback"):
        hub.serve(app, 0, host="0.0.0.0")
    server = hub.serve(app, deploy.free_port())
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url, verifications, _ = request_download_link("@fedrec/fedrec", "0.1.0",
                                                      f"http://127.0.0.1:{port}/v1/hub/fetch-fab", "fab_url")
        assert url.startswith(f"http://127.0.0.1:{port}/") and verifications == app.verifications()
        assert requests.get(url, timeout=10).content == app.fab.read_bytes()
        for app_id, version in (("@fedrec/fedrec", "9.9.9"), ("@evil/app", "0.1.0")):
            with pytest.raises(ValueError, match="not found"):
                request_download_link(app_id, version, f"http://127.0.0.1:{port}/v1/hub/fetch-fab", "fab_url")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ---------------------------------------------------------------- a real nginx
class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.seen.append((self.command, self.path))
        body = b"upstream"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@slow
def test_a_real_nginx_forwards_fleet_posts_and_nothing_else(tmp_path):
    import http.client

    tls = deploy.make_ca_and_certs(tmp_path / "tls", hosts=["127.0.0.2", "localhost", "127.0.0.1"])
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    upstream.socket = context.wrap_socket(upstream.socket, server_side=True)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    public_port = deploy.free_port("127.0.0.2")
    files = proxy.write_nginx_config(tmp_path / "nginx", tls=tls, public_host="127.0.0.2", public_port=public_port,
                                     superlink_port=upstream.server_address[1])
    proxy.check_config(files)
    nginx = deploy.start_process("nginx", proxy.nginx_command(files), tmp_path / "nginx.log")
    client = ssl.create_default_context(cafile=str(tls.ca_cert))
    try:
        deploy.wait_for_port(nginx, "127.0.0.2", public_port, timeout=30)

        def call(method: str, path: str) -> int:
            conn = http.client.HTTPSConnection("127.0.0.2", public_port, context=client, timeout=30)
            try:
                conn.request(method, path, body=b"x" if method != "GET" else None)
                return conn.getresponse().status
            finally:
                conn.close()

        for path in proxy.FLEET_PATHS:
            assert call("POST", path) == 200, path
        refused = [("GET", proxy.FLEET_PATHS[0]), ("PUT", "/v1/fleet/pull-messages"),
                   ("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-supernode"),
                   ("POST", "/v1/runtime/acquire-task"), ("GET", "/docs"), ("GET", "/health"),
                   ("POST", "/v1/fleet/pull-messages/"), ("POST", "/v1/fleet/../control/start-run"),
                   ("POST", "/v1/fleet/%2e%2e/control/start-run"),
                   ("POST", "/V1/FLEET/PULL-MESSAGES")]
        statuses = {f"{m} {p}": call(m, p) for m, p in refused}
        assert all(s in (403, 404, 400) for s in statuses.values()), statuses
        time.sleep(0.2)
        forwarded = {path.split("?")[0] for method, path in _Recorder.seen}
        assert all(m == "POST" for m, _ in _Recorder.seen) and forwarded <= set(proxy.FLEET_PATHS), _Recorder.seen
    finally:
        deploy.stop_processes([nginx])
        upstream.shutdown()
        upstream.server_close()
        thread.join(timeout=10)
    assert not nginx.alive()
