"""TLS material for the SuperLink (a CA and a server certificate) and SuperNode key pairs."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


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
