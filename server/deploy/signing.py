"""Signed app bundles: devices run only a FAB signed by the operator's publisher key.

Flower 1.42's SuperNode, started with ``--trusted-entities YAML`` (key id -> Ed25519 public
key), runs a FAB only if its ``verifications`` hold a signature by one of those keys over
``signed_at`` (8 bytes, big-endian) + SHA-256(FAB) (``flwr.supernode.start_client_internal.
_verify_fab``). The SuperLink attaches verifications only to apps it fetched from an app hub
(``flwr run @publisher/app==x.y.z``; a FAB sent by ``flwr run DIR`` has none and every such
SuperNode refuses it). The hub is the URL in ``FLWR_SUPERGRID_API_URL``: fedrec serves its own
on 127.0.0.1 (:mod:`server.deploy.hub`), answering with the one FAB the operator signed here.

The publisher key signs; it need not live on the server host (sign elsewhere, copy the signed
app over): whoever holds it decides what code runs on the devices.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from server.deploy.commands import executable
from server.deploy.errors import DeployError
from server.deploy.flwr_cli import PROJECT_ROOT, copy_app
from server.deploy.pki import write_private

SIGNATURE_SUFFIX = ".sig.json"


@dataclass(frozen=True)
class PublisherKey:
    private: Path  # OpenSSH Ed25519 private key (0600): signs app bundles; keep it off the server if you can
    public: Path  # ssh-ed25519 ... : what devices trust
    trusted_entities: Path  # trusted-entities.yaml {key id: public key}: each SuperNode's --trusted-entities
    key_id: str


@dataclass(frozen=True)
class SignedApp:
    fab: Path  # the app bundle, as `flwr build` made it
    signature: Path  # FAB + ".sig.json": [{"public_key_id", "signature", "signed_at"}]
    app_spec: str  # "@fedrec/fedrec==0.1.0": what `flwr run` names instead of a directory

    def verifications(self) -> list[dict]:
        return json.loads(self.signature.read_text())


def key_id(public_line: str) -> str:
    """A stable id of a public key: ``fedrec-`` + 16 hex digits of the SHA-256 of its base64 body."""
    body = public_line.split()[1]
    return "fedrec-" + hashlib.sha256(body.encode("ascii")).hexdigest()[:16]


def make_publisher_key(out_dir: str | Path, *, name: str = "publisher") -> PublisherKey:
    """A fresh Ed25519 key pair ``{name}.key`` (0600) / ``{name}.pub`` and ``trusted-entities.yaml``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = out / f"{name}.key", out / f"{name}.pub"
    write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()))
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    public.write_text(line + "\n")
    return PublisherKey(private, public, write_trusted_entities(out / "trusted-entities.yaml", [public]), key_id(line))


def write_trusted_entities(path: str | Path, public_keys: list[str | Path]) -> Path:
    """``--trusted-entities`` YAML for SuperNodes: one ``key id: 'ssh-ed25519 ...'`` line per key."""
    lines = []
    for pub in public_keys:
        line = Path(pub).read_text().strip()
        if not line.startswith("ssh-ed25519 "):
            raise ValueError(f"{pub}: not an ssh-ed25519 public key (Flower trusts Ed25519 keys only)")
        lines.append(f"{key_id(line)}: '{line}'")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def _spec(pyproject: str) -> str:
    doc = tomllib.loads(pyproject)
    return f"@{doc['tool']['flwr']['app']['publisher']}/{doc['project']['name']}=={doc['project']['version']}"


def app_spec(source: str | Path = PROJECT_ROOT) -> str:
    """``@publisher/name==version`` of the app in ``source`` (a directory or a FAB file)."""
    source = Path(source)
    if source.is_file():
        import zipfile

        with zipfile.ZipFile(source) as fab:
            return _spec(fab.read("pyproject.toml").decode())
    return _spec((source / "pyproject.toml").read_text())


def parse_spec(spec: str) -> tuple[str, str]:
    """``("@publisher/name", "x.y.z")`` of ``@publisher/name==x.y.z``."""
    app_id, _, version = spec.partition("==")
    if not app_id.startswith("@") or "/" not in app_id or not version:
        raise ValueError(f"{spec!r}: expected @publisher/name==x.y.z")
    return app_id, version


def build_fab(out_dir: str | Path, source: str | Path = PROJECT_ROOT) -> Path:
    """``flwr build`` of a copy of the app (pyproject.toml, common/, client/, server/): the FAB file."""
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedrec-build-") as tmp:
        app = copy_app(Path(tmp) / "fedrec", source)
        result = subprocess.run([executable("flwr"), "build", "--app", str(app)], cwd=tmp, capture_output=True,
                                text=True, timeout=300, stdin=subprocess.DEVNULL,
                                env={**_env(), "FLWR_HOME": str(Path(tmp) / "home")})
        fabs = sorted(Path(tmp).glob("*.fab"))
        if result.returncode != 0 or len(fabs) != 1:
            raise DeployError(f"flwr build failed ({result.returncode}):\n"
                              f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        target = out / fabs[0].name
        shutil.move(str(fabs[0]), target)
    return target


def sign_fab(fab: str | Path, key: str | Path, *, spec: str | None = None, signed_at: int | None = None) -> SignedApp:
    """Sign ``fab`` with the Ed25519 private key ``key`` (OpenSSH): writes FAB + ``.sig.json``."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_ssh_private_key

    fab = Path(fab)
    private = load_ssh_private_key(Path(key).read_bytes(), None)
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{key}: not an Ed25519 key (fedrec deploy app-key makes one)")
    when = int(time.time()) if signed_at is None else int(signed_at)
    message = when.to_bytes(8, "big") + hashlib.sha256(fab.read_bytes()).digest()  # Flower's create_message_to_sign
    signature = base64.urlsafe_b64encode(private.sign(message)).decode().rstrip("=")
    public = private.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    doc = [{"public_key_id": key_id(public), "signature": signature, "signed_at": when}]
    sig = fab.with_name(fab.name + SIGNATURE_SUFFIX)
    sig.write_text(json.dumps(doc, indent=1) + "\n")
    return SignedApp(fab, sig, spec or app_spec(fab))


def load_signed_app(directory: str | Path, *, spec: str | None = None) -> SignedApp:
    """The one signed FAB in ``directory`` (what ``fedrec deploy sign`` wrote)."""
    fabs = sorted(Path(directory).glob("*.fab"))
    signed = [f for f in fabs if f.with_name(f.name + SIGNATURE_SUFFIX).is_file()]
    if len(signed) != 1:
        raise ValueError(f"{directory}: expected exactly one signed app (NAME.fab with NAME.fab{SIGNATURE_SUFFIX}), "
                         f"found {len(signed)}; make one with fedrec deploy sign")
    return SignedApp(signed[0].absolute(), signed[0].with_name(signed[0].name + SIGNATURE_SUFFIX).absolute(),
                     spec or app_spec(signed[0]))


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "NO_COLOR": "1"}
