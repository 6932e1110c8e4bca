"""External peers against `devid serve` as a real process: openssl s_client, libcoap's
coap-client-openssl and coap-client-gnutls. Plus the refusals, checked from both ends."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from devid.ca.keys import plain_key
from devid.ca.revocation import revoke_device
from devid.gateway.app.datadir import DataDir
from devid.gateway.app.server import POLICY_FILE
from devid.gateway.factory.provisioning import provision

from .conftest import NOW, free_port, make_csr, register_device, tool
from .gateway_helpers import POLICY

COAP_GET_WKC = b"\x40\x01\x12\x34\xbb.well-known\x04core"      # CON GET /.well-known/core, MID 0x1234


def write_identity(directory: Path, key, cert, chain, root_pem: bytes) -> Path:
    directory.mkdir(parents=True)
    (directory / "key.pem").write_bytes(plain_key(key))
    os.chmod(directory / "key.pem", 0o600)
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "chain.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [cert, *chain]))
    (directory / "ca.pem").write_bytes(root_pem)
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data directory with good and bad identities, and a running `devid serve`."""
    base = tmp_path_factory.mktemp("interop")
    data = DataDir(base / "data")
    data.init(NOW)
    reg = data.open_registry()
    ca = data.authority(reg)
    root_pem = data.cert_pem("root")
    provision(ca, count=4, device_type="temperature-sensor", out=base / "factory",
              manufacturing_pem=data.cert_pem("manufacturing"), root_pem=root_pem, now=lambda: NOW)
    ids = {f"dev{i}": base / "factory" / f"SN0000000{i}" for i in range(1, 4)}
    # a device type whose policy waives attestation: libcoap clients enroll it with /sen alone
    (data.path / POLICY_FILE).write_text(POLICY)
    provision(ca, count=1, device_type="legacy-sensor", out=base / "factory", serial_prefix="LG",
              manufacturing_pem=data.cert_pem("manufacturing"), root_pem=root_pem, now=lambda: NOW)
    ids["legacy"] = base / "factory" / "LG00000001"
    revoke_device(reg, "SN00000004", "keyCompromise", NOW)
    ids["revoked"] = base / "factory" / "SN00000004"
    # an operational identity that expired
    key = ec.generate_private_key(ec.SECP256R1())
    register_device(ca, "OLD1")
    old = ca.issue_operational(make_csr(key)[0], "OLD1", NOW - timedelta(days=120))
    ids["expired"] = write_identity(base / "expired", key, old.cert, [data.cert("operational")], root_pem)
    # a device of another manufacturer (another CA)
    other = DataDir(base / "other")
    other.init(NOW)
    oreg = other.open_registry()
    okey, oissued = register_device(other.authority(oreg), "SN00000001")
    ids["foreign"] = write_identity(base / "foreign", okey, oissued.cert, [other.cert("manufacturing")], root_pem)
    # a certificate the manufacturing CA signed that the registry never recorded: a copy of dev1's
    # (same subject and extensions) with another key and serial, not made by devid
    mfg = data.issuer("manufacturing")
    ukey = ec.generate_private_key(ec.SECP256R1())
    real = x509.load_pem_x509_certificate((ids["dev1"] / "cert.pem").read_bytes())
    builder = (x509.CertificateBuilder().subject_name(real.subject).issuer_name(real.issuer)
               .public_key(ukey.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(real.not_valid_before_utc).not_valid_after(real.not_valid_after_utc))
    for ext in real.extensions:
        value = (x509.SubjectKeyIdentifier.from_public_key(ukey.public_key())
                 if isinstance(ext.value, x509.SubjectKeyIdentifier) else ext.value)
        builder = builder.add_extension(value, ext.critical)
    unknown = builder.sign(mfg.key, hashes.SHA256())
    ids["unknown"] = write_identity(base / "unknown", ukey, unknown, [data.cert("manufacturing")], root_pem)
    # the gateway's own server certificate presented as a client
    gw = data.issuer("gateway")
    ids["gateway"] = write_identity(base / "gateway", gw.key, gw.cert, [data.cert("operational")], root_pem)
    reg.close()
    oreg.close()

    port = free_port()
    log = base / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data.path)
    proc = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", f"127.0.0.1:{port}",
                             "--listen", f"[::1]:{port}"], stdout=subprocess.PIPE, stderr=open(log, "wb"), env=env)
    line = proc.stdout.readline().decode()
    assert "listening on" in line, line + log.read_text()
    yield {"port": port, "ids": ids, "log": log, "proc": proc, "data": data}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def log_events(world, since: int = 0) -> list[dict]:
    events = []
    text = world["log"].read_text()
    for line in text[:text.rfind("\n") + 1].splitlines()[since:]:    # complete lines only
        obj = json.loads(line)          # every log line is one JSON object (docs/gateway.md#logs)
        if obj["logger"] == "devid.dtls":
            events.append(obj)
    return events


def wait_for_event(world, since: int, predicate, timeout: float = 10.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for ev in log_events(world, since):
            if predicate(ev):
                return ev
        time.sleep(0.05)
    raise AssertionError(f"no matching event in the gateway log:\n{world['log'].read_text()[-3000:]}")


def line_count(world) -> int:
    return len(world["log"].read_text().splitlines())


def s_client(world, ident: Path | None, *extra, stdin: bytes = COAP_GET_WKC, host="127.0.0.1", wait=2.5):
    cmd = [tool("openssl"), "s_client", "-dtls1_2", "-connect", f"{host}:{world['port']}", "-ign_eof",
           "-CAfile", str(world["ids"]["dev1"] / "ca.pem"), "-verify_return_error", *extra]
    if ident is not None:
        cmd += ["-cert", str(ident / "cert.pem"), "-key", str(ident / "key.pem"),
                "-cert_chain", str(ident / "chain.pem")]
    # -ign_eof keeps s_client alive after stdin ends, so the response can arrive; it is stopped
    # after `wait` seconds unless the handshake failed and it left by itself
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(stdin, timeout=wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_openssl_s_client_mutual_auth_and_coap_get(world):
    since = line_count(world)
    proc = s_client(world, world["ids"]["dev1"])
    out = proc.stdout
    assert b"</.well-known/core>" in out and b"</whoami>" in out, proc.stderr.decode()[-2000:]
    ev = wait_for_event(world, since, lambda e: e.get("result") == "ok")
    assert ev["serial"] == "SN00000001" and ev["kind"] == "factory"


def test_openssl_s_client_negotiates_the_rfc7925_ccm8_suite(world):
    since = line_count(world)
    proc = s_client(world, world["ids"]["dev2"], "-cipher", "ECDHE-ECDSA-AES128-CCM8:@SECLEVEL=0")
    assert b"</whoami>" in proc.stdout, proc.stderr.decode()[-2000:]
    ev = wait_for_event(world, since, lambda e: e.get("result") == "ok")
    assert ev["cipher"] == "ECDHE-ECDSA-AES128-CCM8"


def test_openssl_computes_the_session_nonce_the_gateway_computes(world):
    """Issue 13 item 1, interop: the system's openssl (another OpenSSL build than the gateway's)
    exports the session's keying material with devid's label and length; the gateway's value for
    that session, as /whoami tells it, is the same."""
    whoami = b"\x40\x01\x12\x35\xb6whoami"          # CON GET /whoami, MID 0x1235
    proc = s_client(world, world["ids"]["dev1"], "-keymatexport", "EXPERIMENTAL-devid-attestation-nonce",
                    "-keymatexportlen", "32", stdin=whoami)
    out = proc.stdout.decode(errors="replace")
    exported = re.search(r"Keying material: ([0-9A-Fa-f]+)", out)
    assert exported, out[-2000:]
    said = re.search(rb'"session_nonce": "([0-9a-f]+)"', proc.stdout)
    assert said, out[-2000:]
    assert len(said.group(1)) == 64 and said.group(1).decode() == exported.group(1).lower()


@pytest.mark.parametrize("client", ["coap-client-openssl", "coap-client-gnutls"])
@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_libcoap_clients_get_well_known_core(world, client, host):
    ident = world["ids"]["dev3"]
    since = line_count(world)
    proc = subprocess.run([tool(client), "-m", "get", "-c", str(ident / "chain.pem"), "-j", str(ident / "key.pem"),
                           "-R", str(ident / "ca.pem"), "-B", "10",
                           f"coaps://{host}:{world['port']}/.well-known/core"], capture_output=True, timeout=30)
    assert b"</whoami>" in proc.stdout, (proc.stdout + proc.stderr).decode()[-2000:]
    ev = wait_for_event(world, since, lambda e: e.get("result") == "ok")
    assert ev["serial"] == "SN00000003"
    # ct names what each resource returns (RFC 7252 7.2.1), the default first
    ct = dict(re.findall(r'<([^>]+)>[^,]*?;ct="([^"]+)"', proc.stdout.decode()))
    assert ct == {"/.well-known/core": "40", "/whoami": "50", "/.well-known/est/crts": "281 287",
                  "/.well-known/est/sen": "281 287 62", "/.well-known/est/sren": "281 287 62", "/attest/nonce": "60",
                  "/attest/evidence": "60", "/config": "60 50", "/psk": "18"}, proc.stdout.decode()


def coap_client(world, client: str, ident: Path, path: str, *args: str) -> tuple[str, str, str]:
    """Run a libcoap client at verbosity 7 (it prints every PDU); the response's code and options
    as it shows them, and everything it printed."""
    proc = subprocess.run([tool(client), "-c", str(ident / "chain.pem"), "-j", str(ident / "key.pem"),
                           "-R", str(ident / "ca.pem"), "-B", "10", "-v", "7", *args,
                           f"coaps://127.0.0.1:{world['port']}{path}"], capture_output=True, timeout=30)
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    # v:1 t:ACK c:2.04 i:87b3 {01} [ Content-Format:281, Block2:1/_/1024 ] :: ...
    answers = re.findall(r"t:(?:ACK|CON|NON) c:([2-5]\.\d\d) i:\w+ \{\w*\} \[ ?(.*?) ?\]", text)
    assert answers, text[-3000:]
    code, options = answers[-1]
    return code, options, text


CLIENTS = pytest.mark.parametrize("client", ["coap-client-openssl", "coap-client-gnutls"])


@CLIENTS
def test_libcoap_sen_without_accept_gets_281_and_287_on_request(world, client, tmp_path):
    """RFC 9148 4.3: no Accept, 281 (the certificate and the operational CA); -A 287: the certificate."""
    ident = world["ids"]["legacy"]
    op_ca = world["data"].cert("operational")
    for accept, fmt in (((), "281"), (("-A", "287"), "287")):
        key = ec.generate_private_key(ec.SECP256R1())
        (tmp_path / "op.csr").write_bytes(make_csr(key)[0])
        out = tmp_path / f"op.{fmt}"
        code, options, text = coap_client(world, client, ident, "/.well-known/est/sen", "-m", "post", "-t", "286",
                                           "-f", str(tmp_path / "op.csr"), "-o", str(out), *accept)
        assert code == "2.04" and f"Content-Format:{fmt}" in options, text[-3000:]
        if fmt == "281":
            certs = pkcs7.load_der_pkcs7_certificates(out.read_bytes())
            [cert] = [c for c in certs if c.public_key() == key.public_key()]
            assert [c for c in certs if c is not cert] == [op_ca]
        else:
            assert x509.load_der_x509_certificate(out.read_bytes()).public_key() == key.public_key()


@CLIENTS
def test_libcoap_whoami_with_accept_cbor_gets_406(world, client):
    code, options, text = coap_client(world, client, world["ids"]["dev1"], "/whoami", "-A", "60")
    assert code == "4.06" and "Content-Format:257" in options, text[-3000:]
    assert "this resource offers content format 50" in text
    code, options, text = coap_client(world, client, world["ids"]["dev1"], "/whoami", "-A", "50")
    assert code == "2.05" and '"serial": "SN00000001"' in text, text[-3000:]


@CLIENTS
def test_libcoap_nonce_has_max_age_0(world, client):
    code, options, text = coap_client(world, client, world["ids"]["dev2"], "/attest/nonce")
    assert code == "2.05" and "Max-Age:0" in options.split(", "), text[-3000:]


@pytest.mark.parametrize("which,reason,alert", [
    ("revoked", "revoked", "certificate revoked"),
    ("expired", "expired", "certificate expired"),
    ("unknown", "unknown to the registry", "bad certificate"),
    ("foreign", "certificate refused", "unknown ca"),
    ("gateway", "certificate", "unsupported certificate"),
    (None, "no certificate", "handshake failure"),
])
def test_refused_identities(world, which, reason, alert):
    since = line_count(world)
    ident = world["ids"][which] if which else None
    proc = s_client(world, ident)
    assert b"</whoami>" not in proc.stdout
    ev = wait_for_event(world, since, lambda e: e.get("result") == "refused")
    if which is None:
        assert "certificate" in ev["reason"].lower(), ev
    else:
        assert reason in ev["reason"], ev
    # the client got the alert that says why (OpenSSL reports it), not internal_error nor a silent timeout
    said = (proc.stderr + proc.stdout).decode().lower()
    assert f"alert {alert}" in said, said[-1500:]


@pytest.mark.parametrize("client,said", [("coap-client-openssl", "certificate revoked"),
                                         ("coap-client-gnutls", "certificate was revoked")])
def test_libcoap_sees_why_a_revoked_device_is_refused(world, client, said):
    """A field engineer's libcoap log names the refusal (issue: it said internal_error)."""
    ident = world["ids"]["revoked"]
    proc = subprocess.run([tool(client), "-v", "7", "-m", "get", "-c", str(ident / "chain.pem"), "-j",
                           str(ident / "key.pem"), "-R", str(ident / "ca.pem"), "-B", "5",
                           f"coaps://127.0.0.1:{world['port']}/whoami"], capture_output=True, timeout=30)
    text = (proc.stdout + proc.stderr).decode().lower()
    assert said in text and "internal error" not in text, text[-2000:]


def test_sigterm_shuts_down_cleanly(world):
    proc = world["proc"]
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read().decode()
    assert proc.wait(15) == 0
    assert "shutting down" in rest and "stopped" in rest
    assert "Traceback" not in world["log"].read_text()


def test_sigint_shuts_down_cleanly(world, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(world["data"].path)
    proc = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert "listening" in proc.stdout.readline().decode()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0 and b"stopped" in out and b"Traceback" not in err
