"""Deployment on Flower 1.42's SuperLink/SuperNode runtime (server/deploy.py).

Fast: the TLS files, SuperNode keys and flwr config as Flower itself reads them, the commands,
``run-dir`` resolution, and stopping process trees by PID.

Slow (end to end, no Ray): a SuperLink with TLS and SuperNode authentication on 127.0.0.1, three
SuperNodes on device stores made with ``fedrec-client import``, runs started with ``flwr run``
and judged by their real status (``flwr ls``). One federation serves all of them (starting it
costs ~20 s); every process it started is stopped by PID when the module ends, also after a
failure (``Deployment.__exit__``). Each message to a SuperNode starts a ``flwr-clientapp``
process, so rounds are slow: the model and the data are tiny.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.store import DeviceStore
from server import deploy
from tests.conftest import write_block_csv

slow = pytest.mark.slow

N_DEVICES = 3
# The proxy's "public" address. Loopback, but not the SuperLink's 127.0.0.1: whatever answers
# here is what the network sees.
PUBLIC_HOST = "127.0.0.2"
# A tiny run: everyone in every round, SecAgg+ among 3 (every node shares with both others,
# threshold 2), seeded DP noise, no budget cap, evaluation only after the last round.
BASE = {"fed.sample-rate": 1.0, "model.dim": 8, "fed.timeout": 90.0, "fed.eval-every": 1000,
        "fed.eval-clients": 0, "dp.enabled": True, "dp.noise-seed": 0, "dp.target-epsilon": 0.0,
        "secagg.num-shares": 3, "secagg.reconstruction-threshold": 2}


# ---------------------------------------------------------------- fast: files, commands, run-dir
def _tls_handshake(tls: deploy.TLSFiles, server_name: str, cafile: Path) -> None:
    """A real TLS handshake on 127.0.0.1: the server presents server.pem, the client checks it
    against ``cafile`` and ``server_name`` (as the SuperNode and flwr do)."""
    import socket
    import ssl
    import threading

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls.server_cert, tls.server_key)
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve():
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_name):
                    pass
        finally:
            thread.join(timeout=10)


def test_the_server_certificate_is_signed_by_the_ca_for_every_host(tmp_path):
    import ssl

    from cryptography import x509

    tls = deploy.make_ca_and_certs(tmp_path, hosts=["fedrec.example.org", "10.1.2.3", "localhost", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fedrec.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "127.0.0.1"]
    for private in (tls.server_key, tls.ca_key):
        assert private.stat().st_mode & 0o777 == 0o600
    for name in ("localhost", "127.0.0.1"):  # a DNS name and an IP address SAN both verify
        _tls_handshake(tls, name, tls.ca_cert)
    other = deploy.make_ca_and_certs(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(tls, "localhost", other.ca_cert)
    with pytest.raises(ssl.SSLCertVerificationError):  # a name the certificate was not made for
        _tls_handshake(tls, "elsewhere.example.org", tls.ca_cert)


def test_node_keys_are_p384_in_the_formats_flower_reads(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    pairs = deploy.make_node_keys(tmp_path, 2)
    assert [p.private.name for p in pairs] == ["node1.key", "node2.key"]
    for pair in pairs:
        private = load_ssh_private_key(pair.private.read_bytes(), None)  # what flower-supernode does
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert pair.private.stat().st_mode & 0o777 == 0o600
        assert pair.public.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert try_load_public_key(pair.public)  # what `flwr supernode register` does
    assert pairs[0].public.read_bytes() != pairs[1].public.read_bytes()


def test_the_flwr_connection_is_read_by_flower(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    tls = deploy.make_ca_and_certs(tmp_path / "tls")
    deploy.write_flwr_config(tmp_path / "home", address="127.0.0.1:9093", root_certificates=tls.ca_cert)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    for name in (deploy.CONNECTION, None):  # by name, and as the default
        conn = read_superlink_connection(name)
        assert conn.address == "127.0.0.1:9093" and conn.insecure is False
        assert conn.root_certificates == str(tls.ca_cert.absolute())


def test_the_commands_carry_tls_node_auth_and_the_device_store(tmp_path):
    from client.cli import supernode_command

    tls = deploy.make_ca_and_certs(tmp_path / "tls")
    key = deploy.make_node_keys(tmp_path, 1)[0]
    secret = deploy.write_secret(tmp_path / "superexec.secret")
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes()) == 64
    link = deploy.superlink_command(tls, database=tmp_path / "state.sqlite", secret_file=secret, port=9300)
    flags = dict(zip(link[1::2], link[2::2]))
    assert Path(link[0]).name == "flower-superlink"
    assert {"--enable-supernode-auth", "--disable-runtime-dependency-installation"} <= set(link)
    assert flags["--ssl-ca-certfile"] == str(tls.ca_cert) and flags["--ssl-certfile"] == str(tls.server_cert)
    assert flags["--ssl-keyfile"] == str(tls.server_key) and flags["--database"] == str(tmp_path / "state.sqlite")
    # loopback only; `process` isolation, the only one in which Flower 1.42 uses the SuperExec secret
    assert (flags["--host"], flags["--port"], flags["--isolation"]) == ("127.0.0.1", "9300", "process")
    assert flags["--superexec-auth-secret-file"] == str(secret) and "--insecure" not in link
    for public in ("0.0.0.0", "10.0.0.5", "fedrec.example.org", "::"):
        with pytest.raises(ValueError, match="loopback"):
            deploy.superlink_command(tls, database=tmp_path / "s.sqlite", secret_file=secret, host=public)
    execs = deploy.superexec_command(runtime_address="127.0.0.1:9300", root_certificates=tls.ca_cert,
                                     secret_file=secret)
    flags = dict(zip(execs[1::2], execs[2::2]))
    assert Path(execs[0]).name == "flower-superexec" and flags["--superexec-auth-secret-file"] == str(secret)
    assert flags["--runtime-api-address"] == "127.0.0.1:9300" and "--insecure" not in execs
    assert "--allow-runtime-dependency-installation" not in execs

    db = tmp_path / "device.sqlite"
    node = deploy.supernode_command(superlink="127.0.0.1:9300", root_certificates=tls.ca_cert, db=db, port=9401,
                                    auth_key=key.private)
    assert node == supernode_command(superlink="127.0.0.1:9300", root_certificates=tls.ca_cert, db=db, port=9401,
                                     auth_key=key.private)  # exactly what `fedrec-client join` runs on a device
    flags = dict(zip(node[1::2], node[2::2]))
    assert flags["--node-config"] == f"data-path='{db}'" and flags["--port"] == "9401"
    assert flags["--auth-supernode-private-key"] == str(key.private) and "--insecure" not in node
    assert "--trusted-entities" not in node
    trusted = deploy.make_publisher_key(tmp_path / "publisher").trusted_entities
    node = deploy.supernode_command(superlink="127.0.0.1:9300", root_certificates=tls.ca_cert, db=db, port=9401,
                                    auth_key=key.private, trusted_entities=trusted)
    assert node[node.index("--trusted-entities") + 1] == str(trusted)


def test_run_config_overrides_are_checked_and_typed(tmp_path):
    from flwr.common.config import parse_config_args

    path = deploy.write_run_config(tmp_path / "o.toml", {"fed.rounds": "3", "fed.timeout": 30, "dp.enabled": "false",
                                                          "run-dir": "exp 1", "data.source": "/data/my ratings.csv"})
    assert parse_config_args([str(path)]) == {"fed.rounds": 3, "fed.timeout": 30.0, "dp.enabled": False,
                                              "run-dir": "exp 1", "data.source": "/data/my ratings.csv"}
    with pytest.raises(ValueError, match="fed.round"):
        deploy.write_run_config(tmp_path / "bad.toml", {"fed.round": 3})


def test_run_dir_is_created_resumed_or_refused(tmp_path):
    from common.config import RunConfig
    from server.app import flwr_run_dir
    from server.run_dir import ConfigMismatchError

    cfg = RunConfig.from_flat({"run-dir": "exp", "fed.rounds": 4})
    run = flwr_run_dir(cfg, tmp_path)
    assert run.path == tmp_path / "exp" and run.config() == cfg  # relative: under the runs root
    assert flwr_run_dir(cfg.replace(**{"run-dir": str(tmp_path / "exp")}), tmp_path).path == run.path  # same run
    with pytest.raises(ConfigMismatchError, match="fed.rounds"):
        flwr_run_dir(cfg.replace(**{"fed.rounds": 5}), tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a fedrec run directory"):
        flwr_run_dir(cfg.replace(**{"run-dir": str(tmp_path / "other")}), tmp_path)
    fresh = flwr_run_dir(RunConfig(), tmp_path / "runs")  # no run-dir: a new timestamped one
    assert fresh.path.parent == tmp_path / "runs" and fresh.config() == RunConfig()


def test_stop_processes_ends_a_whole_tree_by_pid_including_orphans_and_stubborn_children(tmp_path):
    import psutil

    stubborn = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)")
    parent = deploy.start_process("tree", [sys.executable, "-c", f"import subprocess, sys, time; "
                                           f"subprocess.Popen([sys.executable, '-c', {stubborn!r}]); time.sleep(120)"],
                                  tmp_path / "tree.log")
    orphaner = deploy.start_process("orphaner", ["sh", "-c", "sleep 120 & exit 0"], tmp_path / "orphan.log")
    deadline = time.monotonic() + 60
    while len(psutil.Process(parent.pid).children(recursive=True)) < 2:
        assert time.monotonic() < deadline, "the process tree did not start"
        time.sleep(0.1)
    orphaner.popen.wait(timeout=30)
    members = [psutil.Process(parent.pid), *psutil.Process(parent.pid).children(recursive=True)]
    orphans = [p for p in psutil.process_iter() if p.pid != orphaner.pid and _pgid(p.pid) == orphaner.pid]
    assert orphans  # `sleep` outlived its shell

    deploy.stop_processes([parent, orphaner], timeout=2.0)

    for p in members + orphans:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, p


def _pgid(pid: int) -> int | None:
    import os

    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_fedrec_deploy_certs_and_keys_refuse_to_overwrite(tmp_path, capsys):
    from server.cli import main

    assert main(["deploy", "certs", "--out", str(tmp_path / "tls"), "--host", "fedrec.example.org"]) == 0
    assert main(["deploy", "certs", "--out", str(tmp_path / "tls")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["deploy", "keys", "--out", str(tmp_path / "keys"), "-n", "2"]) == 0
    assert "flwr supernode register" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["node1.key", "node1.pub", "node2.key", "node2.pub"]
    assert main(["deploy", "keys", "--out", str(tmp_path / "keys"), "-n", "1"]) == 2


# ---------------------------------------------------------------- slow: a federation on this machine
def make_devices(root: Path, n: int) -> tuple[Path, list[Path]]:
    """A small ratings CSV (the server's data.source: it defines the item catalogue), its items
    file, and one device store per user made the way a user makes one (fedrec-client import)."""
    csv = write_block_csv(root / "ratings.csv", n_users=n, n_items=24, per_user=10)
    items = deploy.write_catalog(root / "items.csv", source=str(csv))
    header, *rows = csv.read_text().splitlines()
    dbs = []
    for u in range(n):
        mine = root / f"user{u}.csv"
        mine.write_text("\n".join([header, *(r for r in rows if r.startswith(f"u{u},"))]) + "\n")
        db = root / f"device{u}.sqlite"
        subprocess.run([sys.executable, "-m", "client.cli", "--db", str(db), "import", str(mine),
                        "--items", str(items)], check=True, capture_output=True, text=True)
        dbs.append(db)
    return csv, dbs


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    csv, dbs = make_devices(root, N_DEVICES)
    with deploy.Deployment(root / "fed", dbs, host=PUBLIC_HOST) as fed:
        fed.csv = csv
        yield fed
    # Deployment.__exit__ has stopped the SuperLink and the SuperNodes, children included.
    assert not fed.superlink.alive() and not any(n.proc.alive() for n in fed.nodes)


def shared_paths(root: Path) -> list[str]:
    """Every path under ``root`` (itself included) that its group or others may use."""
    return [f"{oct(p.stat().st_mode & 0o777)} {p}" for p in [root, *root.rglob("*")]
            if p.stat().st_mode & 0o077 and not p.is_symlink()]


def fit_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "fit"]


def online_nodes(fed) -> set[str]:
    return {row["node-id"] for row in fed.nodes_status() if row["status"] == "online"}


def wait_exit(proc: deploy.Proc, timeout: float = 90.0) -> int:
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.name} still running after {timeout:.0f} s; its log ends:\n{deploy.tail(proc.log)}")


def gone(process, timeout: float = 30.0) -> None:
    """Wait until a process we do not parent is dead (gone, or a zombie its parent has yet to reap)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)
    pytest.fail(f"process {process.pid} still alive {timeout:.0f} s after SIGKILL")


@slow
def test_a_secure_private_run_completes_on_three_supernodes(federation):
    fed = federation
    registered = {str(n.node_id) for n in fed.nodes}
    assert online_nodes(fed) == registered  # exactly the registered keys, all online
    before = set(fed.runs_dir.glob("*")) if fed.runs_dir.exists() else set()

    status = fed.run({**BASE, "data.source": str(fed.csv), "fed.rounds": 2, "secagg.enabled": True}, timeout=480)

    assert status.status == "finished:completed", status  # flwr run exits 0 either way: this is flwr ls
    (run_dir,) = set(fed.runs_dir.glob("*")) - before
    assert (run_dir / "model.safetensors").is_file()
    assert (run_dir / "privacy_report.html").is_file()
    # what the devices imported before the first run is what the run publishes
    assert (run_dir / "items.csv").read_text() == (fed.csv.parent / "items.csv").read_text()
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [e["round"] for e in ledger["ledger"]["events"]] == [1, 2]
    rows = fit_rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["participants"] == N_DEVICES and r["failures"] == 0 for r in rows), rows
    assert json.loads((run_dir / "config.json").read_text())["secagg.enabled"] is True
    # Each device kept the global model it was sent last (the final one, sent for evaluation).
    for node in fed.nodes:
        with DeviceStore(node.db, create=False) as store:
            assert store.get_global_model().round == 2
    # Finding 7: the SuperLink's state (database, -wal, -shm), its logs, unpacked bundles and
    # the run directory are private: files 0600, directories 0700.
    state = [fed.database, fed.database.with_name(fed.database.name + "-wal"),
             fed.database.with_name(fed.database.name + "-shm")]
    assert all(p.is_file() for p in state), state
    assert not shared_paths(fed.server.workdir) and not shared_paths(run_dir)


@slow
@pytest.mark.parametrize("keyed", [True, False], ids=["unregistered-key", "no-key"])
def test_a_supernode_without_a_registered_key_is_rejected(federation, tmp_path, keyed):
    fed = federation
    key = deploy.make_node_keys(tmp_path, 1, prefix="rogue")[0] if keyed else None
    proc = fed.start_supernode(fed.nodes[0].db, key, name=f"rogue-{'key' if keyed else 'nokey'}")
    assert wait_exit(proc) != 0  # Flower exit code 305: the SuperLink refused to activate it
    log = proc.log_text()
    if keyed:
        assert "Failed to activate SuperNode" in log, log
        assert "No SuperNode found with the given public key" in fed.superlink.log_text()
    else:
        assert "All SuperNodes must be registered" in log, log
    assert online_nodes(fed) == {str(n.node_id) for n in fed.nodes}


@slow
def test_a_supernode_trusting_another_ca_fails_the_tls_handshake(federation, tmp_path):
    fed = federation
    other = deploy.make_ca_and_certs(tmp_path / "other-ca")
    key = deploy.make_node_keys(tmp_path, 1, prefix="wrongca")[0]
    deploy.register_node(key.public, fed.flwr_home)  # a valid, registered key: only the CA is wrong
    proc = fed.start_supernode(fed.nodes[0].db, key, root_certificates=other.ca_cert, name="wrong-ca")
    assert wait_exit(proc) != 0
    log = proc.log_text()
    assert "CERTIFICATE_VERIFY_FAILED" in log, log
    assert online_nodes(fed) == {str(n.node_id) for n in fed.nodes}  # it never connected


OUTSIDER = Path(__file__).with_name("deploy_outsider.py")


@slow
def test_an_outsider_with_only_ca_crt_registers_lists_acquires_and_runs_nothing(federation, tmp_path):
    """Finding 1 (issue #12): from another process, with only the public ca.crt and the address
    the devices dial, Flower's own tools must not register a key, list nodes, take a ServerApp
    task (AcquireTask) or start a run."""
    import ipaddress

    fed = federation
    host = fed.address.rsplit(":", 1)[0].strip("[]")
    assert ipaddress.ip_address(host).is_loopback  # this test talks to loopback addresses only
    nodes_before = {row["node-id"] for row in fed.nodes_status()}
    runs_before = {r["run-id"] for r in deploy.list_runs(fed.flwr_home)}
    try:
        results = run_outsider(fed.address, fed.tls.ca_cert, tmp_path)
    finally:
        new_runs = {r["run-id"] for r in deploy.list_runs(fed.flwr_home)} - runs_before
        for run_id in new_runs:  # the operator stops what got through before the other tests go on
            fed.stop_run(int(run_id))

    assert set(results) == {"register", "list", "acquire", "run"}
    assert not any(r["succeeded"] for r in results.values()), json.dumps(results, indent=1)
    assert {row["node-id"] for row in fed.nodes_status()} == nodes_before  # no key of the outsider's
    assert not new_runs  # no run of the outsider's


def run_outsider(address: str, ca: Path, workdir: Path, *extra: str) -> dict:
    """tests/deploy_outsider.py in its own process, with a copy of ca.crt and nothing else."""
    import shutil

    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca, workdir / "ca.crt")
    out = subprocess.run([sys.executable, str(OUTSIDER), "--address", address, "--ca", str(workdir / "ca.crt"),
                          "--workdir", str(workdir / "outsider"), *extra], capture_output=True, text=True,
                         timeout=400, cwd=workdir, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@slow
def test_the_superlink_listens_on_loopback_only_and_the_proxy_forwards_only_fleet_calls(federation):
    import http.client
    import ssl

    fed = federation
    link = fed.server.superlink_port
    assert deploy.port_open("127.0.0.1", link) and not deploy.port_open(PUBLIC_HOST, link)  # not 0.0.0.0
    context = ssl.create_default_context(cafile=str(fed.tls.ca_cert))

    def status(method: str, path: str) -> int:
        conn = http.client.HTTPSConnection(PUBLIC_HOST, fed.server.public_port, context=context, timeout=30)
        try:
            conn.request(method, path, body=b"" if method == "POST" else None,
                         headers={"content-type": "application/protobuf"})
            return conn.getresponse().status
        finally:
            conn.close()

    for path in ("/v1/control/list-runs", "/v1/control/register-supernode", "/v1/runtime/acquire-task",
                 "/v1/runtime/get-nodes", "/docs", "/openapi.json", "/health", "/v1/fleet/", "/v1/fleet/../control/x",
                 "/v1/fleet/get-run/../../control/start-run"):
        assert status("POST" if path.startswith("/v1") else "GET", path) == 404, path
    assert status("GET", "/v1/fleet/get-run") == 403  # Fleet calls are POST only
    assert status("POST", "/v1/fleet/get-run") not in (403, 404)  # reaches the SuperLink (which wants a signed node)


@slow
def test_on_the_server_host_acquire_task_needs_the_superexec_secret_and_devices_run_only_signed_apps(
        federation, tmp_path):
    """A local user of the server host reaches the SuperLink's loopback port. The Runtime API
    refuses it tasks (no SuperExec secret); the Control API still takes its run (Flower 1.42
    authenticates nobody there without OIDC: see docs/DEPLOY.md), but no device runs the
    unsigned bundle's ClientApp."""
    fed = federation
    marker = tmp_path / "outsider-ran"
    runs_before = {r["run-id"] for r in deploy.list_runs(fed.flwr_home)}
    results = run_outsider(fed.control_address, fed.tls.ca_cert, tmp_path, "--only", "acquire,run",
                           "--marker", str(marker))
    assert not results["acquire"]["succeeded"], results
    assert "401" in results["acquire"]["detail"], results

    assert results["run"]["succeeded"], results  # the documented residual risk
    (run_id,) = {r["run-id"] for r in deploy.list_runs(fed.flwr_home)} - runs_before
    fed.wait_for_run(int(run_id), timeout=300)
    assert not marker.exists()
    for node in fed.nodes:
        assert "The FAB could not be verified" in node.proc.log_text(), node.proc.log
    assert online_nodes(fed) == {str(n.node_id) for n in fed.nodes}


@slow
def test_a_killed_serverapp_resumes_from_its_checkpoint_with_run_dir(federation, tmp_path):
    fed = federation
    run_dir = tmp_path / "resumable"
    cfg = {**BASE, "data.source": str(fed.csv), "fed.rounds": 4, "secagg.enabled": False, "run-dir": str(run_dir)}
    first = fed.start_run(cfg)

    from server.run_dir import RunDir

    checkpoint = RunDir(run_dir)  # one atomic file: the round, model and ledger together
    deadline = time.monotonic() + 420
    while not ((run_dir / "config.json").is_file() and (checkpoint.checkpoint_round() or 0) >= 2):
        assert time.monotonic() < deadline, "round 2 never checkpointed"
        time.sleep(0.2)
    (serverapp,) = fed.serverapp_processes()  # flwr-serverapp, started by the SuperLink's SuperExec
    serverapp.kill()  # SIGKILL by PID: a crash, no chance to clean up
    gone(serverapp)
    killed_at = checkpoint.checkpoint_round()
    assert killed_at == 2
    done_before = [r for r in fit_rows(run_dir) if r["round"] <= killed_at]

    # Flower 1.42 cannot restart a run: a new run with the same run-dir continues the old one.
    second = fed.start_run(cfg)
    status = fed.wait_for_run(second, timeout=420)
    assert status.status == "finished:completed", status

    rows = fit_rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]  # each round once: 3 and 4 by the second run
    assert rows[:killed_at] == done_before  # rounds 1-2 were not redone
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [e["round"] for e in ledger["ledger"]["events"]] == [1, 2, 3, 4]  # ε of rounds 1-2 still counted
    assert (run_dir / "model.safetensors").is_file()
    # The killed run is not reported as a success: the SuperLink fails it when its heartbeats stop.
    killed = fed.wait_for_run(first, timeout=180)
    assert killed.status == "finished:failed", killed

    # Resuming with another config is refused by name, and the run is reported as failed.
    refused = fed.run({**cfg, "fed.rounds": 5}, check=False, timeout=300)
    assert refused.status == "finished:failed", refused
    assert "cannot resume" in deploy.run_log(refused.run_id, fed.flwr_home)
    assert [r["round"] for r in fit_rows(run_dir)] == [1, 2, 3, 4]  # untouched
