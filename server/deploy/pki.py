"""TLS material for the SuperLink (a CA and a server certificate, host names checked, validity
capped) and SuperNode key pairs."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
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


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (no window in which others can read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


# Validity limits. A server certificate of at most 397 days is what browsers and the CA/Browser
# Forum accept for public TLS; the CA lives longer, so a new server certificate (``renew``) does
# not mean a new ca.crt on every device. A server certificate never outlives its CA.
SERVER_DAYS = 397
CA_DAYS = 1825
MAX_SERVER_DAYS = 397
MAX_CA_DAYS = 3650
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def validate_host(host: str) -> str:
    """``host`` as it goes into the server certificate: an IP address (normalised) or a DNS
    name (lower case); anything else raises ValueError saying what is wrong.

    Refused: a scheme (``https://...``), a port (``10.0.0.5:9093``), brackets, spaces, wildcards,
    empty or over-long labels, characters outside letters, digits and ``-`` (write an
    internationalised name in its ``xn--`` form), and all-numeric names that are not an IP
    address (``10.0.0.256``)."""
    if not isinstance(host, str) or not host.strip():
        raise ValueError("an empty host name: give a DNS name or an IP address")
    text = host.strip()
    why = None
    if "://" in text or "/" in text:
        why = "a URL: give the host name alone, without scheme, port or path"
    elif any(ch.isspace() for ch in text):
        why = "contains white space"
    elif text.startswith("[") or text.endswith("]"):
        why = "brackets: give an IPv6 address without them"
    else:
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            pass
        if ":" in text:
            why = "has a port: give the name or address alone (ports are not part of a certificate)"
        elif "*" in text:
            why = "a wildcard: list every name the devices use"
        else:
            name = text[:-1] if text.endswith(".") else text
            labels = name.split(".")
            if len(name) > 253:
                why = "longer than the 253 characters of a DNS name"
            elif not all(_LABEL.match(label) for label in labels):
                why = ("not a DNS name: labels of 1-63 letters, digits and '-', not starting or ending with "
                       "'-' (internationalised names in their xn-- form)")
            elif all(label.isdigit() for label in labels):
                why = "all-numeric but not a valid IP address"
            else:
                return name.lower()
    raise ValueError(f"host {host!r}: {why}")


def validate_hosts(hosts: Sequence[str]) -> list[str]:
    """:func:`validate_host` for each, duplicates dropped, order kept; at least one."""
    checked = list(dict.fromkeys(validate_host(h) for h in hosts))
    if not checked:
        raise ValueError("at least one host name or IP address is needed for the server certificate")
    return checked


def _check_days(days: int, limit: int, what: str) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= limit:
        raise ValueError(f"{what} validity {days!r} days: expected 1 to {limit} days")


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(out_dir: str | Path, *, days: int = CA_DAYS, name: str = "fedrec CA") -> tuple[Path, Path]:
    """A fresh CA (self-signed, CA:TRUE, path length 0, P-384) valid ``days`` (at most
    :data:`MAX_CA_DAYS`): ``ca.crt`` (public) and ``ca.key`` (0600) in ``out_dir``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    _check_days(days, MAX_CA_DAYS, "CA")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    ca_cert, ca_key = out / "ca.crt", out / "ca.key"
    ca_cert.write_bytes(cert.public_bytes(pem))
    write_private(ca_key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_cert, ca_key


def make_server_cert(out_dir: str | Path, hosts: Sequence[str], *, ca_cert: str | Path, ca_key: str | Path,
                     days: int = SERVER_DAYS) -> tuple[Path, Path]:
    """A server certificate (P-256, serverAuth) signed by the CA in ``ca_cert``/``ca_key``, valid
    for every name in ``hosts`` (validated; DNS names and IP addresses as such SANs) for
    ``days`` (at most :data:`MAX_SERVER_DAYS`) and never past the CA's own expiry:
    ``server.pem`` and ``server.key`` (0600) in ``out_dir``. Also renews a server certificate
    without touching ca.crt."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    _check_days(days, MAX_SERVER_DAYS, "server certificate")
    names = validate_hosts(hosts)
    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), None)
    if signer.public_key().public_numbers() != ca.public_key().public_numbers():
        raise ValueError(f"{ca_key} is not the private key of {ca_cert}")
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = min(now + dt.timedelta(days=days), ca.not_valid_after_utc)
    if until <= now + dt.timedelta(minutes=5):
        raise ValueError(f"the CA {ca_cert} has expired: make a new one (fedrec deploy certs)")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
        .sign(signer, hashes.SHA256())
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = serialization.Encoding.PEM
    server_cert, server_key = out / "server.pem", out / "server.key"
    write_private(server_key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server_cert.write_bytes(cert.public_bytes(pem))
    return server_cert, server_key


def make_ca_and_certs(out_dir: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS, *, days: int = SERVER_DAYS,
                      ca_days: int = CA_DAYS, ca_name: str = "fedrec CA", write_ca_key: bool = True) -> TLSFiles:
    """A fresh CA (:func:`make_ca`, ``ca_days``) and a server certificate signed by it
    (:func:`make_server_cert`, ``days``, every name in ``hosts``).

    Writes ``ca.crt``, ``server.pem``, ``server.key`` (0600) and, unless ``write_ca_key`` is
    False, ``ca.key`` (0600) into ``out_dir``. Every host and both validities are checked
    before anything is written.
    """
    validate_hosts(hosts)
    _check_days(days, MAX_SERVER_DAYS, "server certificate")
    _check_days(ca_days, MAX_CA_DAYS, "CA")
    if days > ca_days:
        raise ValueError(f"the server certificate ({days} days) cannot outlive its CA ({ca_days} days)")
    out = Path(out_dir)
    ca_cert, ca_key = make_ca(out, days=ca_days, name=ca_name)
    server_cert, server_key = make_server_cert(out, hosts, ca_cert=ca_cert, ca_key=ca_key, days=days)
    if not write_ca_key:
        ca_key.unlink()
    return TLSFiles(ca_cert, server_cert, server_key, ca_key if write_ca_key else None)


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
        write_private(pair.private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                       serialization.NoEncryption()))
        pair.public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                               serialization.PublicFormat.OpenSSH) + b"\n")
        keys.append(pair)
    return keys
