"""The SuperLink's app hub: a small HTTP server on 127.0.0.1 that answers Flower 1.42's
``/hub/fetch-fab`` with the one signed app bundle and serves that file.

The SuperLink asks it (``FLWR_SUPERGRID_API_URL=http://127.0.0.1:PORT/v1``) when the operator
runs ``flwr run @fedrec/fedrec==0.1.0``, and attaches the answer's ``verifications`` to the run's
FAB; SuperNodes started with ``--trusted-entities`` check that signature before they run any of
its code (:mod:`server.deploy.signing`). The hub holds no secret: it serves what was signed
elsewhere, read-only.

    python -m server.deploy.hub --port 9099 --app-dir signed/
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from server.deploy.signing import SignedApp, load_signed_app, parse_spec

FETCH_PATH = "/v1/hub/fetch-fab"
MAX_REQUEST = 64 * 1024


def make_handler(app: SignedApp, port: int) -> type[BaseHTTPRequestHandler]:
    app_id, version = parse_spec(app.app_spec)
    fab_path = f"/fabs/{app.fab.name}"

    class Handler(BaseHTTPRequestHandler):
        server_version = "fedrec-hub"
        sys_version = ""

        def _reply(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, doc: object) -> None:
            self._reply(status, json.dumps(doc).encode())

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length") or 0)
            if self.path != FETCH_PATH or not 0 < length <= MAX_REQUEST:
                return self._json(404, {"detail": "not found"})
            try:
                asked = json.loads(self.rfile.read(length))
            except ValueError:
                return self._json(400, {"detail": "not JSON"})
            if asked.get("app_id") != app_id or asked.get("app_version") not in (None, version):
                return self._json(404, {"detail": {"available_app_versions": [version]}})
            return self._json(200, {"fab_url": f"http://127.0.0.1:{port}{fab_path}",
                                    "verifications": app.verifications()})

        def do_GET(self) -> None:  # noqa: N802
            if self.path != fab_path:
                return self._json(404, {"detail": "not found"})
            return self._reply(200, app.fab.read_bytes(), "application/octet-stream")

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
            sys.stderr.write(f"hub: {self.address_string()} {format % args}\n")

    return Handler


def serve(app: SignedApp, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """A hub for ``app`` on ``host:port`` (loopback only); call ``serve_forever()`` on it."""
    import ipaddress

    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the hub listens on loopback addresses only, not {host}")
    return ThreadingHTTPServer((host, port), make_handler(app, port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.deploy.hub", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--app-dir", required=True, type=Path, help="the directory fedrec deploy sign wrote")
    parser.add_argument("--app-spec", help="@publisher/name==x.y.z (default: this checkout's)")
    args = parser.parse_args(argv)
    httpd = serve(load_signed_app(args.app_dir, spec=args.app_spec), args.port)
    print(f"hub on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
