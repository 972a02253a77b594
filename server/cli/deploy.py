"""``fedrec deploy``: TLS files, SuperNode and publisher keys, a signed app bundle, the item list,
the server host and a whole local federation (docs/DEPLOY.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.choices import DataFormat, values
from common.cli import UsageError
from server.cli._args import load_data, positive_int


def add_deploy_commands(commands: argparse._SubParsersAction) -> None:
    from server.deploy.commands import HUB_PORT, PUBLIC_PORT, SUPERLINK_PORT
    from server.deploy.pki import CA_DAYS, MAX_CA_DAYS, MAX_SERVER_DAYS, SERVER_DAYS

    deploy = commands.add_parser(
        "deploy", help="deploy on Flower's SuperLink/SuperNodes (TLS, node auth)",
        description="Material and processes for a real deployment on Flower 1.42 (see docs/DEPLOY.md).")
    deploy_cmds = deploy.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)
    certs = deploy_cmds.add_parser(
        "certs", help="a CA and a SuperLink server certificate",
        description="Create a CA (ca.crt, ca.key) and a server certificate signed by it (server.pem, server.key) "
                    "valid for every --host (DNS names and IP addresses). ca.crt goes to every device and to "
                    "flwr; server.* stay on the server host; keep ca.key offline. --renew makes only a new "
                    "server certificate from an existing CA (devices keep their ca.crt).")
    certs.add_argument("--out", required=True, metavar="DIR", help="directory to write the files to")
    certs.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                       help="a name devices use to reach the SuperLink, without scheme or port (repeatable; "
                            "localhost and 127.0.0.1 are always added)")
    certs.add_argument("--days", type=positive_int, default=SERVER_DAYS,
                       help=f"server certificate validity in days (default and maximum {MAX_SERVER_DAYS})")
    certs.add_argument("--ca-days", type=positive_int, default=CA_DAYS,
                       help=f"CA validity in days (default {CA_DAYS}, maximum {MAX_CA_DAYS})")
    certs.add_argument("--renew", action="store_true",
                       help="only a new server.pem/server.key, signed by DIR/ca.crt and --ca-key")
    certs.add_argument("--ca-key", metavar="FILE", help="the CA's private key for --renew (default DIR/ca.key)")
    certs.add_argument("--force", action="store_true",
                       help="overwrite existing files (a new CA: every device then needs the new ca.crt)")
    certs.set_defaults(handler=cmd_deploy_certs)
    keys = deploy_cmds.add_parser(
        "keys", help="SuperNode authentication key pairs (ECDSA P-384, OpenSSH format)",
        description="Create N key pairs PREFIX1.key/PREFIX1.pub ... The .pub files are registered on the server "
                    "(flwr supernode register KEY.pub CONNECTION); each .key goes to its device only.")
    keys.add_argument("--out", required=True, metavar="DIR", help="directory to write the keys to")
    keys.add_argument("-n", type=positive_int, default=1, metavar="N", help="how many key pairs (default 1)")
    keys.add_argument("--prefix", default="node", help="file name prefix (default node)")
    keys.add_argument("--force", action="store_true", help="overwrite existing key files")
    keys.set_defaults(handler=cmd_deploy_keys)
    items = deploy_cmds.add_parser(
        "items", help="the items file devices import before joining",
        description="Write items.csv (item_id,title, one row per model row) for a data source: the file every run "
                    "directory publishes, needed by devices before the first run (fedrec-client import --items).")
    items.add_argument("--data", default="ml-100k", metavar="SOURCE", help="the run's data.source (default ml-100k)")
    items.add_argument("--format", default=DataFormat.AUTO, choices=values(DataFormat), help="the run's data.format")
    items.add_argument("--item-file", default="", metavar="FILE", help="the run's data.item-file")
    items.add_argument("--out", default="items.csv", metavar="FILE", help="where to write it (default items.csv)")
    items.add_argument("--embed", action="store_true",
                       help="also publish the items' MiniLM sentence embeddings beside it (ITEMS.embeddings.safetensors):"
                            " devices that run the hybrid model then import them instead of embedding the catalogue")
    items.set_defaults(handler=cmd_deploy_items)
    app_key = deploy_cmds.add_parser(
        "app-key", help="the publisher key that signs app bundles (Ed25519)",
        description="Create publisher.key (0600: signs app bundles; keep it off the server if you can), "
                    "publisher.pub and trusted-entities.yaml (to every device: fedrec-client join "
                    "--trusted-entities).")
    app_key.add_argument("--out", required=True, metavar="DIR", help="directory to write the files to")
    app_key.add_argument("--force", action="store_true", help="overwrite existing files")
    app_key.set_defaults(handler=cmd_deploy_app_key)
    sign = deploy_cmds.add_parser(
        "sign", help="build this checkout's app bundle and sign it",
        description="flwr build of this checkout's Flower app (pyproject.toml, common/, client/, server/), signed "
                    "with the publisher key: NAME.fab and NAME.fab.sig.json in --out, what fedrec deploy server "
                    "serves to the SuperLink.")
    sign.add_argument("--key", required=True, metavar="FILE", help="publisher.key (fedrec deploy app-key)")
    sign.add_argument("--out", required=True, metavar="DIR", help="directory for the signed bundle (emptied of *.fab)")
    sign.set_defaults(handler=cmd_deploy_sign)
    server = deploy_cmds.add_parser(
        "server", help="the server host: nginx (public, Fleet API only), SuperLink (127.0.0.1), SuperExec, app hub",
        description="Start nginx on --host:--port (HTTPS; forwards only the Fleet API calls of SuperNodes), the "
                    "SuperLink on 127.0.0.1:--superlink-port (TLS, node auth, SQLite state, process isolation "
                    "with a SuperExec secret), its SuperExec and the app hub serving the signed bundle on "
                    "127.0.0.1:--hub-port; print how to use flwr on this host; stop everything on Ctrl-C.")
    server.add_argument("--tls", required=True, metavar="DIR", help="ca.crt, server.pem, server.key (deploy certs)")
    server.add_argument("--app-dir", required=True, metavar="DIR", help="the signed bundle (fedrec deploy sign)")
    server.add_argument("--workdir", default="server-state", metavar="DIR",
                        help="SuperLink state, logs, flwr config, secret (default server-state; kept private)")
    server.add_argument("--host", required=True, metavar="NAME_OR_IP",
                        help="the public address nginx listens on (one of the certificate's names)")
    server.add_argument("--port", type=positive_int, default=PUBLIC_PORT, help=f"public port (default {PUBLIC_PORT})")
    server.add_argument("--superlink-port", type=positive_int, default=SUPERLINK_PORT,
                        help=f"the SuperLink's port on 127.0.0.1 (default {SUPERLINK_PORT})")
    server.add_argument("--hub-port", type=positive_int, default=HUB_PORT,
                        help=f"the app hub's port on 127.0.0.1 (default {HUB_PORT})")
    server.add_argument("--runs-dir", default="runs", metavar="DIR", help="where runs are written (default runs)")
    server.set_defaults(handler=cmd_deploy_server)
    local = deploy_cmds.add_parser(
        "local", help="a whole deployment on this machine: the server host and one SuperNode per device store",
        description="Make TLS files, one key per device and a publisher key, sign this checkout's app bundle, "
                    "start the server host (as fedrec deploy server) and one SuperNode per device store given "
                    "(each with its own key and port, trusting only the publisher key), register the keys, wait "
                    "until every node is online, print how to start a run with flwr, stop everything on Ctrl-C.")
    local.add_argument("dbs", nargs="+", metavar="DB", help="device stores (fedrec-client --db DB import ...)")
    local.add_argument("--workdir", default="deploy-local", metavar="DIR",
                       help="TLS files, keys, logs, flwr config and SuperLink state (default deploy-local)")
    local.add_argument("--host", default="127.0.0.1", help="the proxy's address devices dial (default 127.0.0.1)")
    local.add_argument("--port", type=positive_int, help="the proxy's port (default: a free one)")
    local.add_argument("--runs-dir", default="runs", metavar="DIR", help="where runs are written (default runs)")
    local.set_defaults(handler=cmd_deploy_local)


def _refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise UsageError(f"{', '.join(existing)} already exist(s); --force overwrites")


def cmd_deploy_certs(args: argparse.Namespace) -> int:
    from server.deploy.pki import DEFAULT_HOSTS, make_ca_and_certs, make_server_cert, validate_hosts

    out = Path(args.out)
    try:
        hosts = validate_hosts([*args.host, *DEFAULT_HOSTS])
        if args.renew:
            ca_key = Path(args.ca_key) if args.ca_key else out / "ca.key"
            for needed in (out / "ca.crt", ca_key):
                if not needed.is_file():
                    raise UsageError(f"{needed}: no such file (--renew signs with an existing CA)")
            cert, key = make_server_cert(out, hosts, ca_cert=out / "ca.crt", ca_key=ca_key, days=args.days)
            print(f"new server certificate for {', '.join(hosts)}: {cert}, {key} (0600); restart the SuperLink "
                  f"and the proxy. Devices keep their ca.crt.")
            return 0
        _refuse_overwrite([out / n for n in ("ca.crt", "ca.key", "server.pem", "server.key")], args.force)
        files = make_ca_and_certs(out, hosts, days=args.days, ca_days=args.ca_days)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"server certificate for {', '.join(hosts)} (valid {args.days} days; CA {args.ca_days} days)")
    print(f"  {files.ca_cert}     CA certificate: to every device (--root-certificates) and to flwr")
    print(f"  {files.server_cert}  SuperLink and proxy certificate")
    print(f"  {files.server_key}  its private key (0600)")
    print(f"  {files.ca_key}      CA private key (0600): keep it offline; only needed for --renew")
    return 0


def cmd_deploy_keys(args: argparse.Namespace) -> int:
    from server.deploy import make_node_keys

    out = Path(args.out)
    _refuse_overwrite([out / f"{args.prefix}{i}.{ext}" for i in range(1, args.n + 1) for ext in ("key", "pub")],
                      args.force)
    for pair in make_node_keys(out, args.n, prefix=args.prefix):
        print(f"{pair.private} (to its device only)   register: flwr supernode register {pair.public} CONNECTION")
    return 0


def cmd_deploy_items(args: argparse.Namespace) -> int:
    from server.deploy import write_catalog

    load_data(args.data, args.format, args.item_file)  # a bad source ends here with its file and line
    out = write_catalog(args.out, source=args.data, fmt=args.format, item_file=args.item_file)
    print(f"{out}: the item list of {args.data} (devices: fedrec-client import --items {out.name})")
    if args.embed:
        from common.config import ModelConfig
        from common.data.items_file import read_items_with_texts
        from common.models.hybrid.text import embeddings_file_for, publish_embeddings

        _, _, texts = read_items_with_texts(out)
        target = embeddings_file_for(out)
        publish_embeddings(target, list(texts), ModelConfig().text_max_length)
        print(f"{target}: their MiniLM sentence embeddings (public; a device importing {out.name} takes them from "
              "beside it)")
    return 0


def cmd_deploy_app_key(args: argparse.Namespace) -> int:
    from server.deploy.signing import make_publisher_key

    out = Path(args.out)
    _refuse_overwrite([out / n for n in ("publisher.key", "publisher.pub", "trusted-entities.yaml")], args.force)
    key = make_publisher_key(out)
    print(f"  {key.private}  signs app bundles (0600): fedrec deploy sign --key {key.private}")
    print(f"  {key.trusted_entities}  to every device: fedrec-client join --trusted-entities (key id {key.key_id})")
    return 0


def cmd_deploy_sign(args: argparse.Namespace) -> int:
    from server.deploy.errors import DeployError
    from server.deploy.signing import build_fab, sign_fab

    out = Path(args.out)
    if not Path(args.key).is_file():
        raise UsageError(f"--key {args.key}: no such file (fedrec deploy app-key makes one)")
    for old in out.glob("*.fab*"):  # the hub serves exactly one bundle
        old.unlink()
    try:
        app = sign_fab(build_fab(out), args.key)
    except (ValueError, DeployError) as exc:  # flwr build's output may follow the first line
        raise UsageError.from_text(str(exc)) from None
    print(f"{app.fab} signed ({app.signature.name}); runs name it {app.app_spec}")
    return 0


def _watch(procs: Callable[[], list]) -> int:
    """Sleep until Ctrl-C/SIGTERM (130) or until one of ``procs()`` exits (a UsageError)."""
    import time

    from server import deploy

    while True:
        time.sleep(2)
        dead = [p for p in procs() if p is not None and not p.alive()]
        if dead:
            raise UsageError(f"{dead[0].name} exited with status {dead[0].popen.returncode}; its log "
                             f"{dead[0].log} ends:", details=deploy.tail(dead[0].log))


def _foreground(start: Callable[[], Any], body: Callable[[Any], int], what: str) -> int:
    """Run ``body(start())`` with SIGTERM and SIGINT turned into a clean stop of everything."""
    import signal

    from server.deploy.errors import DeployError

    def on_signal(signum, frame):  # noqa: ARG001 - SIGTERM (and SIGINT, even if inherited as ignored) stop everything
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with start() as running:
            return body(running)
    except (DeployError, ValueError) as exc:  # a log's tail may follow the first line
        raise UsageError.from_text(str(exc)) from None
    except KeyboardInterrupt:
        print(f"stopped: {what}", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_deploy_server(args: argparse.Namespace) -> int:
    from server.deploy.pki import TLSFiles
    from server.deploy.serverhost import ServerHost
    from server.deploy.signing import load_signed_app

    tls_dir = Path(args.tls)
    tls = TLSFiles(tls_dir / "ca.crt", tls_dir / "server.pem", tls_dir / "server.key")
    missing = [str(p) for p in (tls.ca_cert, tls.server_cert, tls.server_key) if not p.is_file()]
    if missing:
        raise UsageError(f"{', '.join(missing)}: no such file (fedrec deploy certs --out {args.tls} ...)")
    try:
        app = load_signed_app(args.app_dir)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def start() -> ServerHost:
        return ServerHost(args.workdir, tls=tls, app=app, public_host=args.host, public_port=args.port,
                          superlink_port=args.superlink_port, hub_port=args.hub_port, runs_dir=args.runs_dir)

    def body(host: ServerHost) -> int:
        print(f"devices: fedrec-client join --superlink {host.address} --root-certificates ca.crt "
              f"--trusted-entities trusted-entities.yaml --auth-key KEY")
        print(f"SuperLink on {host.control_address} (loopback only; state {host.database}); runs go to "
              f"{host.runs_dir}. On this host:\n")
        print(host.connection_help())
        print("\nCtrl-C stops everything.", flush=True)
        return _watch(host.processes)

    return _foreground(start, body, "nginx, SuperLink, SuperExec, hub")


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from client.store import DeviceStore, StoreError
    from server import deploy

    catalogs = set()
    for db in args.dbs:
        try:
            with DeviceStore(db, create=False) as store:
                catalog = store.catalog()[0]
        except StoreError as exc:
            raise UsageError(str(exc)) from None
        if not catalog:
            raise UsageError(f"{db}: no item catalogue; import the server's items file first "
                             "(fedrec-client --db DB import --items items.csv)")
        catalogs.add(catalog)
    if len(catalogs) > 1:
        raise UsageError("the device stores hold different item catalogues: import the same items file into each")
    if not (deploy.PROJECT_ROOT / "pyproject.toml").is_file():
        raise UsageError(f"no pyproject.toml in {deploy.PROJECT_ROOT}: run from a fedrec source checkout")

    def start() -> deploy.Deployment:
        return deploy.Deployment(args.workdir, args.dbs, host=args.host, port=args.port, runs_dir=args.runs_dir)

    def body(fed: deploy.Deployment) -> int:
        print(f"proxy on {fed.address} (Fleet API only), SuperLink on {fed.control_address} (TLS: "
              f"{fed.tls.ca_cert.parent}, state: {fed.database})")
        for i, node in enumerate(fed.nodes, 1):
            print(f"  SuperNode {i}: {node.db} (node id {node.node_id}, runtime port {node.port}, "
                  f"log {node.proc.log})")
        print(f"{len(fed.nodes)} SuperNodes online, running only bundles signed by {fed.publisher.public}; runs are "
              f"written to {fed.runs_dir}. Start a run with\n")
        print(fed.connection_help())
        print("\n(the run's data.source must give the items file the devices imported). Ctrl-C stops everything.",
              flush=True)
        return _watch(lambda: [*fed.server.processes(), *(n.proc for n in fed.nodes)])

    return _foreground(start, body, "SuperLink, SuperExec, proxy, hub and SuperNodes")

