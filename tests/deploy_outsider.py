"""The outsider of finding 1 (issue #12), run as its own process by tests/test_deploy.py.

Someone on the network who has nothing but the public ``ca.crt`` (every device has it) and the
address the devices dial. With Flower's own tools it tries to

- ``register``: get its own node key admitted (``flwr supernode register``, Control API);
- ``list``: list the federation's nodes (``flwr supernode ls``, Control API);
- ``acquire``: take a pending ServerApp task as if it were the SuperExec (``AcquireTask``,
  Runtime API; the answer carries the task's token);
- ``run``: start a run of its own app (``flwr run``: its ServerApp and ClientApp code would run
  on the server and on every device).

Prints one JSON object ``{attack: {"succeeded": bool, "detail": str}}``. Only the address given
is contacted (the tests give loopback addresses only); every call has a timeout. Its ClientApp
writes ``--marker`` if a device ever runs it.

    python tests/deploy_outsider.py --address HOST:PORT --ca ca.crt --workdir DIR [--only acquire,run]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CONNECTION = "outsider"

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "outsider"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "outsider"

[tool.flwr.app.components]
serverapp = "outsider_app:server"
clientapp = "outsider_app:client"

[tool.flwr.app.config]
"""

APP_CODE = '''\
"""The outsider's code: the ServerApp runs on the server, the ClientApp on every device."""
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

MARKER = {marker!r}
server = ServerApp()
client = ClientApp()


@server.main()
def main(grid, context):
    messages = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in grid.get_node_ids()]
    replies = list(grid.send_and_receive(messages, timeout=120))
    print("outsider: replies", len(replies), "errors", [r.error.reason for r in replies if r.has_error()])


@client.train()
def train(msg, context):
    Path(MARKER).write_text("the outsider's code ran on a device")
    return Message(RecordDict(), reply_to=msg)
'''


def flwr(args: list[str], home: Path, timeout: float = 60.0) -> subprocess.CompletedProcess:
    beside = Path(sys.executable).parent / "flwr"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([str(beside) if beside.is_file() else "flwr", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def outcome(result: subprocess.CompletedProcess, key: str) -> dict:
    """Succeeded when flwr exited 0 and its JSON has ``key`` (a node id, a node list, a run id)."""
    text = result.stdout.strip()
    doc = None
    start = text.find("{")
    if start >= 0:
        try:
            doc = json.JSONDecoder().raw_decode(text, start)[0]
        except json.JSONDecodeError:
            doc = None
    succeeded = result.returncode == 0 and isinstance(doc, dict) and doc.get("success", True) is not False \
        and doc.get(key) not in (None, "")
    return {"succeeded": bool(succeeded), "detail": f"rc {result.returncode}: {(text + result.stderr)[-600:]}"}


def acquire(address: str, ca: Path) -> dict:
    """AcquireTask as the SuperExec would call it, without its secret."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.interceptors.http import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        address, insecure=False, root_certificates=str(ca),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flower-superexec")])
    try:
        response = client.AcquireTask(AcquireTaskRequest(supported_task_types=["serverapp"]))
    except Exception as exc:  # noqa: BLE001 - any refusal (HTTP status, TLS, connection) is a failure
        return {"succeeded": False, "detail": f"{type(exc).__name__}: {exc}"[:600]}
    finally:
        client.close()
    task = response.task.task_id if response.HasField("task") else None
    return {"succeeded": True, "detail": f"answered: task {task}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--ca", required=True, type=Path)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--only", default="register,list,acquire,run", help="comma-separated attacks to try")
    parser.add_argument("--marker", default="/nonexistent/outsider-ran",
                        help="the file its ClientApp writes if a device ever runs it")
    args = parser.parse_args()
    only = set(args.only.split(","))

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    work = args.workdir.absolute()
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{args.address}"\n'
        f'root-certificates = "{args.ca.absolute()}"\ninsecure = false\n')
    key = ec.generate_private_key(ec.SECP384R1())
    pub = work / "outsider.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    app = work / "app"
    app.mkdir(exist_ok=True)
    (app / "pyproject.toml").write_text(APP_PYPROJECT)
    (app / "outsider_app.py").write_text(APP_CODE.format(marker=str(args.marker)))

    attacks = {
        "register": lambda: outcome(flwr(["supernode", "register", str(pub), CONNECTION, "--format", "json"], home),
                                    "node-id"),
        "list": lambda: outcome(flwr(["supernode", "ls", CONNECTION, "--format", "json"], home), "nodes"),
        "acquire": lambda: acquire(args.address, args.ca),
        "run": lambda: outcome(flwr(["run", str(app), CONNECTION, "--format", "json"], home, timeout=120), "run-id"),
    }
    print(json.dumps({name: attack() for name, attack in attacks.items() if name in only}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
