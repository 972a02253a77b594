"""Certificates of a deployment (issue #12, finding 7): host names checked before anything is
written, validity capped (server ≤ 397 days, the CA longer and separate), a server certificate
renewed without a new CA, private files 0600. Fast: no processes."""

from __future__ import annotations

import datetime as dt

import pytest

from server import deploy


def _load(path):
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.parametrize("host, why", [
    ("https://fedrec.example.org:9093", "URL"),
    ("fedrec.example.org/fleet", "URL"),
    ("10.0.0.5:9093", "port"),
    ("fedrec.example.org:9093", "port"),
    ("a b", "white space"),
    (" ", "empty"),
    ("[::1]", "brackets"),
    ("*.example.org", "wildcard"),
    ("10.0.0.256", "not a valid IP"),
    ("-bad.example.org", "not a DNS name"),
    ("bad_name.example.org", "not a DNS name"),
    ("a..b", "not a DNS name"),
    ("x" * 64 + ".org", "not a DNS name"),
    ("bücher.example", "xn--"),
])
def test_a_host_that_would_make_an_invalid_san_is_refused_before_anything_is_written(tmp_path, host, why):
    with pytest.raises(ValueError, match=why):
        deploy.make_ca_and_certs(tmp_path / "tls", hosts=[host, "localhost"])
    assert not (tmp_path / "tls").exists() or not any((tmp_path / "tls").iterdir())


@pytest.mark.parametrize("host, stored", [
    ("Fedrec.Example.ORG", "fedrec.example.org"), ("fedrec.example.org.", "fedrec.example.org"),
    ("10.0.0.5", "10.0.0.5"), ("::1", "::1"), ("2001:DB8::1", "2001:db8::1"), ("xn--bcher-kva.example", None),
    ("localhost", None), ("a-b.c1", None),
])
def test_valid_names_and_addresses_are_kept_normalised(host, stored):
    from server.deploy import pki

    assert pki.validate_host(host) == (stored or host)


def test_the_cli_says_which_host_is_wrong_and_writes_nothing(tmp_path, capsys):
    from server.cli import main

    for bad in ("https://fedrec.example.org:9093", "10.0.0.5:9093", "a b"):
        assert main(["deploy", "certs", "--out", str(tmp_path / "tls"), "--host", bad]) == 2
        assert repr(bad) in capsys.readouterr().err
    assert not (tmp_path / "tls").exists()


def test_validity_is_capped_and_the_ca_outlives_the_server_certificate(tmp_path, capsys):
    from server.cli import main

    assert main(["deploy", "certs", "--out", str(tmp_path / "a"), "--days", "100000"]) == 2
    assert "1 to 397 days" in capsys.readouterr().err
    assert main(["deploy", "certs", "--out", str(tmp_path / "b"), "--ca-days", "100000"]) == 2
    assert "1 to 3650 days" in capsys.readouterr().err
    with pytest.raises(ValueError, match="outlive"):
        deploy.make_ca_and_certs(tmp_path / "c", days=300, ca_days=200)

    assert main(["deploy", "certs", "--out", str(tmp_path / "tls"), "--host", "fedrec.example.org"]) == 0
    ca, server = _load(tmp_path / "tls" / "ca.crt"), _load(tmp_path / "tls" / "server.pem")
    now = dt.datetime.now(dt.timezone.utc)
    assert server.not_valid_after_utc - now <= dt.timedelta(days=397)
    assert ca.not_valid_after_utc - now >= dt.timedelta(days=4 * 365)  # separate, longer
    assert ca.not_valid_after_utc - now <= dt.timedelta(days=3650)
    assert server.not_valid_after_utc < ca.not_valid_after_utc


def test_a_server_certificate_is_renewed_from_the_same_ca_and_never_outlives_it(tmp_path, capsys):
    from server.cli import main

    tls = tmp_path / "tls"
    assert main(["deploy", "certs", "--out", str(tls), "--host", "old.example.org", "--ca-days", "30",
                 "--days", "30"]) == 0
    ca_before = (tls / "ca.crt").read_bytes()
    assert main(["deploy", "certs", "--out", str(tls), "--renew", "--host", "new.example.org"]) == 0
    assert (tls / "ca.crt").read_bytes() == ca_before  # devices keep their ca.crt
    ca, server = _load(tls / "ca.crt"), _load(tls / "server.pem")
    server.verify_directly_issued_by(ca)
    assert server.not_valid_after_utc <= ca.not_valid_after_utc  # 397 days asked, capped at the CA's 30
    assert (tls / "server.key").stat().st_mode & 0o777 == 0o600
    from server.deploy import pki

    other = deploy.make_ca_and_certs(tmp_path / "other")
    with pytest.raises(ValueError, match="not the private key"):
        pki.make_server_cert(tmp_path / "x", ["localhost"], ca_cert=tls / "ca.crt", ca_key=other.ca_key)
    capsys.readouterr()
    assert main(["deploy", "certs", "--out", str(tmp_path / "none"), "--renew"]) == 2
    assert "no such file" in capsys.readouterr().err
