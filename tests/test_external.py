"""Issued certificates and CRLs checked by independent tools: pkilint and `openssl verify`."""

from __future__ import annotations

import subprocess

import pytest
from cryptography.hazmat.primitives import serialization

from devid.ca.hierarchy import CA_NAMES
from devid.ca.revocation import build_crl, revoke_device

from .conftest import NOW, make_csr, register_device, tool
from .external_helpers import pkilint, without_urn_false_positive

def write(path, cert):
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_pkilint_factory_and_operational_certificates(ca, tmp_path):
    _, idevid = register_device(ca, "ABC123DEF456", "temperature-sensor")
    ldevid = ca.issue_operational(make_csr()[0], "ABC123DEF456", NOW)
    for name, cert in (("factory", idevid.cert), ("operational", ldevid.cert)):
        findings = pkilint("cert", write(tmp_path / f"{name}.pem", cert))
        # the URN is reported (a pkilint false positive, see above) and nothing else is
        assert [f["code"] for f in findings] == ["pkix.invalid_uri_syntax"], findings
        assert without_urn_false_positive(findings) == [], findings


@pytest.mark.parametrize("name", CA_NAMES)
def test_pkilint_ca_certificates(data, tmp_path, name):
    assert pkilint("cert", write(tmp_path / f"{name}.pem", data.cert(name))) == []


def test_pkilint_crls(data, ca, registry, tmp_path):
    register_device(ca, "SN1")
    register_device(ca, "SN2")
    ca.issue_operational(make_csr()[0], "SN1", NOW)
    revoke_device(registry, "SN1", "keyCompromise", NOW)
    revoke_device(registry, "SN2", "unspecified", NOW)
    for name in CA_NAMES:
        info = build_crl(data.issuer(name), registry, NOW)
        path = tmp_path / f"{name}.crl.pem"
        path.write_bytes(info.crl.public_bytes(serialization.Encoding.PEM))
        kind = "ARL" if name == "root" else "CRL"
        assert pkilint(kind, path) == [], name
        assert info.entries == {"root": 0, "manufacturing": 2, "operational": 1}[name]


def openssl_verify(root, untrusted, leaf, *extra):
    return subprocess.run([tool("openssl"), "verify", "-CAfile", str(root), "-untrusted", str(untrusted),
                           *extra, str(leaf)], capture_output=True, text=True, timeout=60)


def test_openssl_verifies_issued_certificates_against_the_chain(data, ca, tmp_path):
    _, idevid = register_device(ca, "SN1")
    ldevid = ca.issue_operational(make_csr()[0], "SN1", NOW)
    root = write(tmp_path / "root.pem", data.cert("root"))
    mfg = write(tmp_path / "mfg.pem", data.cert("manufacturing"))
    op = write(tmp_path / "op.pem", data.cert("operational"))
    at = ["-attime", str(int(NOW.timestamp()))]
    ok = openssl_verify(root, mfg, write(tmp_path / "idevid.pem", idevid.cert), *at)
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stderr
    ok = openssl_verify(root, op, write(tmp_path / "ldevid.pem", ldevid.cert), *at, "-purpose", "sslclient")
    assert ok.returncode == 0, ok.stderr
    # wrong intermediate: no path
    bad = openssl_verify(root, op, tmp_path / "idevid.pem", *at)
    assert bad.returncode != 0
    # the gateway certificate is a server certificate, not a client one
    gw = write(tmp_path / "gw.pem", data.cert("gateway"))
    assert openssl_verify(root, op, gw, *at, "-purpose", "sslserver").returncode == 0
    assert openssl_verify(root, op, gw, *at, "-purpose", "sslclient").returncode != 0


def test_openssl_checks_our_crl(data, ca, registry, tmp_path):
    _, good = register_device(ca, "SN1")
    _, bad = register_device(ca, "SN2")
    revoke_device(registry, "SN2", "keyCompromise", NOW)
    crls = tmp_path / "crls.pem"
    crls.write_bytes(b"".join(build_crl(data.issuer(n), registry, NOW).crl.public_bytes(serialization.Encoding.PEM)
                              for n in CA_NAMES))
    root = write(tmp_path / "root.pem", data.cert("root"))
    mfg = write(tmp_path / "mfg.pem", data.cert("manufacturing"))
    at = ["-attime", str(int(NOW.timestamp()) + 60), "-crl_check_all", "-CRLfile", str(crls)]
    ok = openssl_verify(root, mfg, write(tmp_path / "good.pem", good.cert), *at)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    revoked = openssl_verify(root, mfg, write(tmp_path / "bad.pem", bad.cert), *at)
    assert revoked.returncode != 0
    assert "revoked" in (revoked.stdout + revoked.stderr).lower()
