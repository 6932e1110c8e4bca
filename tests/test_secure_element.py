"""Devices whose keys are in a secure element (issue 15, items 2-4): `devid provision
--secure-element` with SoftHSM2 standing in for the element, and the device side with the keys
never leaving the token: libcoap's coap-client-gnutls makes the DTLS handshakes with the token's
keys (through p11-kit), `devid se` makes the evidence, the operational key, its CSR, and stores
the certificates. Real SoftHSM2 tokens, the real gateway (`devid serve`), the real CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from devid.gateway.app.server import POLICY_FILE

from .conftest import NOW, ok, one_line_error, run_devid, tool
from .gateway_helpers import FW, POLICY
from .pkcs11_helpers import MODULE
from .serve_helpers import serve

FIRMWARE = ["--firmware-digest", FW.digest.hex(), "--firmware-name", FW.name, "--firmware-version", FW.version]


def _env(token, so: bool = True) -> dict:
    return {**token.env, **({"DEVID_PKCS11_SO_PIN": token.so_pin} if so else {})}


def provision(data, token, out: Path, count: int = 2, *extra, so: bool = True, prefix: str = "SN"):
    proc = run_devid("provision", "--count", count, "--device-type", "temperature-sensor", "--out", out,
                     "--secure-element", token.uri, "--serial-prefix", prefix, "--json", *extra,
                     data_dir=data.path, env=_env(token, so))
    doc = json.loads(ok(proc))
    assert token.pin not in proc.stdout.decode() + proc.stderr.decode()
    assert token.so_pin not in proc.stdout.decode() + proc.stderr.decode()
    return doc


def se(token, *args) -> str:
    """`devid se ...` with the token's PIN in the environment: its output, which never holds the PIN."""
    proc = run_devid("se", *args, env=token.env)
    out = ok(proc)
    assert token.pin not in out + proc.stderr.decode()
    return out


def read_cert_object(token, label: str) -> x509.Certificate:
    """A certificate object as pkcs11-tool reads it (an independent reader)."""
    with_file = Path(os.environ["SOFTHSM2_CONF"]).parent / f"read-{token.label}-{label}.der"
    proc = subprocess.run([tool("pkcs11-tool"), "--module", MODULE, "--token-label", token.label, "--read-object",
                           "--type", "cert", "--label", label, "--output-file", str(with_file)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return x509.load_der_x509_certificate(with_file.read_bytes())


def key_labels(token) -> set[str]:
    return set(token.private_keys())


@pytest.fixture
def se_data(data, softhsm):
    (data.path / POLICY_FILE).write_text(POLICY)
    return data


# -- provisioning ------------------------------------------------------------------------------------

def test_provision_keeps_the_keys_in_the_token(se_data, token, tmp_path):
    """No key.pem; each key never extractable in the token (pkcs11-tool's listing); the token's
    certificate objects are the issued certificate and the root; the factory certificate passes
    `openssl verify`; secure-element-config.json records the objects, locked."""
    data, out = se_data, tmp_path / "factory"
    doc = provision(data, token, out)
    assert doc["count"] == 2 and doc["ca_certificate_trusted"] is True
    assert doc["secure_element"] == token.uri                       # no PIN, no pin-source
    keys = token.private_keys()
    assert set(keys) == {"SN00000001", "SN00000002"}
    for serial, access in keys.items():
        assert "never extractable" in access and "sensitive" in access, access
        bundle = out / serial
        assert sorted(p.name for p in bundle.iterdir()) == ["ca.pem", "cert.pem", "chain.pem",
                                                             "secure-element-config.json"]
        cert = x509.load_pem_x509_certificate((bundle / "cert.pem").read_bytes())
        assert read_cert_object(token, serial) == cert
        assert read_cert_object(token, "devid-root-ca") == data.cert("root")
        proc = subprocess.run(["openssl", "verify", "-CAfile", str(bundle / "ca.pem"), "-untrusted",
                               str(bundle / "chain.pem"), str(bundle / "cert.pem")], capture_output=True, text=True)
        assert proc.returncode == 0 and ": OK" in proc.stdout, proc.stdout + proc.stderr
        config = json.loads((bundle / "secure-element-config.json").read_text())
        section = config["pkcs11"]
        assert section["token"] == token.uri and section["configuration_locked"] is True
        assert config["provisioning"]["lock_configuration"] is True
        key_entry = section["objects"]["device_private_key"]
        assert {k: key_entry[k] for k in ("slot", "label", "type")} == {"slot": 0, "label": serial, "type": "private"}
        # CKA_ID: the serial, '-', 6 random bytes (no other key in the token shares it); the certificate's is the same
        kid = bytes.fromhex(key_entry["id"])
        assert kid.startswith(serial.encode() + b"-") and len(kid) == len(serial) + 7
        assert section["objects"]["device_certificate"]["id"] == key_entry["id"]
        assert f"ID:         {key_entry['id']}" in token.objects()
        assert section["objects"]["device_certificate"]["slot"] == 10
        assert section["objects"]["ca_certificate"]["slot"] == 11 and section["objects"]["ca_certificate"]["trusted"]
        assert config["certificate"]["serial"] == format(cert.serial_number, "x")
    reg = data.open_registry()
    try:
        assert {d.serial for d in reg.list_devices()} == {"SN00000001", "SN00000002"}
    finally:
        reg.close()
    # the device side reads the same from the token: the factory key never extractable, the CA trusted
    shown = json.loads(se(token, "show", "--device", out / "SN00000001", "--json"))
    assert shown["factory_key"]["never_extractable"] and not shown["factory_key"]["extractable"]
    assert shown["factory_certificate_stored"] and shown["ca_certificate_stored"] and shown["ca_certificate_trusted"]


def test_provision_with_two_workers(se_data, token, tmp_path):
    out = tmp_path / "factory"
    doc = provision(se_data, token, out, 6, "--workers", "2", so=False)
    assert doc["count"] == 6 and doc["ca_certificate_trusted"] is False
    serials = {f"SN{n:08d}" for n in range(1, 7)}
    assert {p.name for p in out.iterdir()} == serials
    assert key_labels(token) == serials
    for serial in serials:
        assert not (out / serial / "key.pem").exists()
        assert read_cert_object(token, serial) == x509.load_pem_x509_certificate((out / serial / "cert.pem").read_bytes())
    # a bundle committed but not yet renamed (a crash between the two) is kept by the next run, key and all
    os.rename(out / "SN00000003", out / ".partial-SN00000003")
    doc = provision(se_data, token, out, 2, "--workers", "2", so=False)
    assert (doc["recovered"], doc["discarded"]) == (1, 0)
    assert {p.name for p in out.iterdir()} == serials | {"SN00000007", "SN00000008"} == key_labels(token)


def test_a_killed_run_leaves_no_registered_device_without_its_key_and_the_rerun_removes_stray_keys(se_data, token,
                                                                                                  tmp_path):
    """kill -9 in the middle of a run: every registered device has its key object; the partial
    bundles' keys are stray until the next run, which refuses without the token and removes them
    with it."""
    data, out = se_data, tmp_path / "factory"
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env.update(_env(token), DEVID_DATA=str(data.path))
    proc = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "provision", "--count", "3000", "--workers",
                             "1", "--device-type", "temperature-sensor", "--out", str(out), "--secure-element",
                             token.uri, "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and len([p for p in out.iterdir() if p.name.startswith(".partial-")]) >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "provisioning finished before it could be killed: raise --count"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    reg = data.open_registry()
    try:
        registered = {d.serial for d in reg.list_devices()}
    finally:
        reg.close()
    stray = key_labels(token) - registered
    assert registered <= key_labels(token) and stray
    # without the token the run refuses (it would leave the stray keys behind), and changes nothing
    refused = run_devid("provision", "--count", "1", "--device-type", "temperature-sensor", "--out", out,
                        data_dir=data.path)
    one_line_error(refused, "--secure-element", f"token '{token.label}'")
    assert key_labels(token) - registered == stray
    doc = provision(data, token, out, 2)
    assert doc["discarded"] >= len(stray) - 1
    reg = data.open_registry()
    try:
        registered = {d.serial for d in reg.list_devices()}
    finally:
        reg.close()
    assert key_labels(token) == registered
    assert {p.name for p in out.iterdir()} == registered


# -- errors ------------------------------------------------------------------------------------------

def test_clear_errors(se_data, token, tmp_path):
    data, out = se_data, tmp_path / "factory"
    wrong = {"DEVID_PKCS11_PIN": "99999999"}
    err = one_line_error(run_devid("provision", "--count", "1", "--device-type", "temperature-sensor", "--out", out,
                                   "--secure-element", token.uri, data_dir=data.path, env=wrong), "wrong PIN")
    assert "99999999" not in err
    one_line_error(run_devid("provision", "--count", "1", "--device-type", "temperature-sensor", "--out", out,
                             "--secure-element", "pkcs11:token=no-such-token", data_dir=data.path, env=token.env),
                   "no token 'no-such-token'")
    one_line_error(run_devid("provision", "--count", "1", "--device-type", "temperature-sensor", "--out", out,
                             "--secure-element", f"pkcs11:token={token.label}?module-path=/nonexistent/p11.so",
                             data_dir=data.path, env=token.env), "/nonexistent/p11.so", "no such file")
    one_line_error(run_devid("provision", "--count", "1", "--device-type", "temperature-sensor", "--out", out,
                             "--secure-element", f"pkcs11:token={token.label};object=x", data_dir=data.path,
                             env=token.env), "names a token, not an object")
    reg = data.open_registry()
    try:
        assert reg.list_devices() == []                 # nothing was registered by the failed runs
    finally:
        reg.close()
    assert key_labels(token) == set()
    doc = provision(data, token, out, 1)
    assert doc["first_serial"] == "SN00000001"      # the failed runs reserved no serial either
    dev = out / "SN00000001"
    err = one_line_error(run_devid("se", "show", "--device", dev, env=wrong), "wrong PIN")
    assert "99999999" not in err
    one_line_error(run_devid("se", "show", "--device", dev, env={"DEVID_PKCS11_PIN": ""}), "DEVID_PKCS11_PIN")
    # devid's own DTLS client cannot use a key in a token: one line pointing at the supported path
    one_line_error(run_devid("enroll", "--gateway", "coaps://127.0.0.1:1", "--device", dev, *FIRMWARE,
                             env=token.env), "secure element", "coap-client-gnutls", "docs/enrollment.md")
    # the key object is gone
    subprocess.run([tool("pkcs11-tool"), "--module", MODULE, "--token-label", token.label, "--login", "--pin",
                    token.pin, "--delete-object", "--type", "privkey", "--label", "SN00000001"],
                   check=True, capture_output=True, timeout=60)
    one_line_error(run_devid("se", "show", "--device", dev, env=token.env), "has no private key", "SN00000001")
    one_line_error(run_devid("se", "show", "--device", tmp_path, env=token.env), "not a device bundle")


# -- enrollment with coap-client-gnutls ---------------------------------------------------------------

class Libcoap:
    """coap-client-gnutls with the token's objects (-c, -j, -R all pkcs11: URIs, the PIN in -J)."""

    def __init__(self, token, uris: dict, port: int, work: Path) -> None:
        self.token, self.uris, self.port, self.work = token, uris, port, work

    def __call__(self, identity: str, method: str, path: str, *extra: str, out: str | None = None) -> bytes:
        target = self.work / (out or "answer.bin")
        target.unlink(missing_ok=True)
        proc = subprocess.run([tool("coap-client-gnutls"), "-m", method, "-c", self.uris[f"{identity}_certificate"],
                               "-j", self.uris[f"{identity}_key"], "-J", self.token.pin,
                               "-R", self.uris["ca_certificate"], "-B", "10", *extra, "-o", str(target),
                               f"coaps://127.0.0.1:{self.port}{path}"], capture_output=True, timeout=60)
        # coap-client exits 0 on failure too: the answer file says whether it worked
        assert target.exists() and target.stat().st_size > 0, (proc.stdout + proc.stderr).decode()[-2000:]
        return target.read_bytes()


def test_a_secure_element_device_enrolls_renews_and_fetches_its_config_with_coap_client_gnutls(se_data, token,
                                                                                              tmp_path):
    data, out = se_data, tmp_path / "factory"
    provision(data, token, out, 1)
    dev, work = out / "SN00000001", tmp_path / "work"
    work.mkdir()
    proc = run_devid("se", "show", "--device", dev, "--json", env=token.env)
    shown = json.loads(ok(proc))
    assert token.pin not in proc.stdout.decode() + proc.stderr.decode()
    served = serve(data.path, tmp_path / "serve.log")
    try:
        coap = Libcoap(token, shown["uris"], served.port, work)
        # classic evidence: nonce, evidence signed by the factory key in the token, verdict
        coap("factory", "get", "/attest/nonce", out="nonce.cbor")
        se(token, "evidence", "--device", dev, "--nonce", work / "nonce.cbor", *FIRMWARE,
                     "--out", work / "evidence.cose")
        verdict = cbor2.loads(coap("factory", "post", "/attest/evidence", "-t", "60", "-f",
                                   str(work / "evidence.cose")))
        assert verdict["verdict"] == "affirming" and verdict["acceptable"] is True, verdict
        # one /sen with the evidence inside the CSR, for the server nonce
        coap("factory", "get", "/attest/nonce", out="nonce.cbor")
        made = json.loads(se(token, "csr", "--device", dev, "--nonce", work / "nonce.cbor", *FIRMWARE,
                                       "--out", work / "op.csr", "--json"))
        assert made == {"ok": True, "out": str(work / "op.csr"), "key_label": "SN00000001-op-new", "evidence": True}
        answer = coap("factory", "post", "/.well-known/est/sen", "-t", "286", "-f", str(work / "op.csr"),
                      out="op.p7")
        issued = [c for c in pkcs7.load_der_pkcs7_certificates(answer) if c.issuer == data.cert("operational").subject]
        stored = json.loads(se(token, "store", "--device", dev, "--cert", work / "op.p7", "--json"))
        assert stored["key_label"] == "SN00000001-op"
        assert read_cert_object(token, "SN00000001-op") == issued[0]
        assert x509.load_pem_x509_certificate((dev / "op-cert.pem").read_bytes()) == issued[0]
        assert x509.load_pem_x509_certificates((dev / "op-chain.pem").read_bytes()) == [issued[0],
                                                                                         data.cert("operational")]
        keys = token.private_keys()
        assert set(keys) == {"SN00000001", "SN00000001-op"} and "never extractable" in keys["SN00000001-op"]
        # GET /config with the operational identity from the token
        config = cbor2.loads(coap("operational", "get", "/config", "-A", "60"))
        assert config["device"] == "SN00000001" and config["device_type"] == "temperature-sensor"
        # renewal: a new key in the token, /sren with the current operational identity, then the old key goes
        se(token, "csr", "--device", dev, "--out", work / "renew.csr")
        assert set(token.private_keys()) == {"SN00000001", "SN00000001-op", "SN00000001-op-new"}
        coap("operational", "post", "/.well-known/est/sren", "-t", "286", "-f", str(work / "renew.csr"),
             out="renew.p7")
        se(token, "store", "--device", dev, "--cert", work / "renew.p7")
        renewed = x509.load_pem_x509_certificate((dev / "op-cert.pem").read_bytes())
        assert renewed.serial_number != issued[0].serial_number
        assert set(token.private_keys()) == {"SN00000001", "SN00000001-op"}
        assert read_cert_object(token, "SN00000001-op") == renewed
        config = cbor2.loads(coap("operational", "get", "/config", "-A", "60", out="config2.cbor"))
        assert config["device"] == "SN00000001"
        reg = data.open_registry()
        try:
            current = [c for c in reg.certificates_for_device("SN00000001") if c.profile == "operational"]
            assert {c.serial for c in current} == {issued[0].serial_number, renewed.serial_number}
        finally:
            reg.close()
    finally:
        assert served.stop() == 0
    # no private key ever left the token: no key file in the bundle, and no PIN in any log or output
    assert not [p.name for p in dev.iterdir() if "key" in p.name]
    for path in [served.log, *dev.iterdir()]:
        text = path.read_bytes()
        assert token.pin.encode() not in text and token.so_pin.encode() not in text, path


def test_doc_commands_are_the_tested_ones():
    """docs/enrollment.md's secure-element section shows the `devid se` and coap-client-gnutls steps
    this file runs, with the same options."""
    doc = (Path(__file__).parent.parent / "docs" / "enrollment.md").read_text()
    section = doc.split("## A device with its keys in a secure element (PKCS#11)", 1)[1].split("\n## ", 1)[0]
    for command in ("devid provision", "--secure-element", "DEVID_PKCS11_SO_PIN", "devid se show",
                    "devid se evidence", "devid se csr", "devid se store", "--nonce nonce.cbor", "-t 286",
                    "/.well-known/est/sen", "/.well-known/est/sren", "-A 60", "-J", "type=private", "type=cert",
                    "devid-root-ca"):
        assert command in section, command
    # the identities hold what Libcoap passes: -c, -j and -R all pkcs11: URIs, the PIN in -J
    for name, label in (("factory", "SN00000001"), ("op", "SN00000001-op")):
        line = re.search(rf"^\$ {name}=\((.*)\)$", section, flags=re.M).group(1)
        assert line == (f'-c "$T;object={label};type=cert" -j "$T;object={label};type=private" '
                        f'-J "$DEVID_PKCS11_PIN" -R "$CA"'), line
    steps = re.findall(r"^\$ coap-client-gnutls -m (\w+) \"\$\{(\w+)\[@\]\}\" (.*) \$GW(\S+)$", section, flags=re.M)
    assert [(m, who, path) for m, who, _, path in steps] == [
        ("get", "factory", "/attest/nonce"), ("post", "factory", "/.well-known/est/sen"), ("get", "op", "/config"),
        ("post", "op", "/.well-known/est/sren")]
    assert all("-B 10" in rest and "-o " in rest for _, _, rest, _ in steps)


# -- what the review found: trust kept, another deployment's token refused, the swap finished --------

def test_a_run_without_the_so_pin_keeps_the_trust_a_run_with_it_gave(se_data, token, tmp_path):
    first = provision(se_data, token, tmp_path / "a", 1, so=True, prefix="TA")
    assert first["ca_certificate_trusted"] is True
    second = provision(se_data, token, tmp_path / "b", 1, so=False, prefix="TB")
    assert second["ca_certificate_trusted"] is True                 # the token says so, not the flag
    shown = json.loads(se(token, "show", "--device", tmp_path / "a" / "TA00000001", "--json"))
    assert shown["ca_certificate_trusted"] is True
    config = json.loads((tmp_path / "b" / "TB00000001" / "secure-element-config.json").read_text())
    assert config["pkcs11"]["objects"]["ca_certificate"]["trusted"] is True


def test_another_deployments_token_is_refused_and_its_keys_stay(se_data, token, tmp_path):
    provision(se_data, token, tmp_path / "a", 2, so=False)
    before = token.objects()
    other = tmp_path / "other"
    ok(run_devid("init", data_dir=other))
    proc = run_devid("provision", "--count", 2, "--device-type", "temperature-sensor", "--out", tmp_path / "b",
                     "--secure-element", token.uri, data_dir=other, env=_env(token, so=False))
    one_line_error(proc, "holds another CA's root certificate")
    assert token.objects() == before and key_labels(token) == {"SN00000001", "SN00000002"}


def test_the_secure_element_repr_holds_no_so_pin(token):
    from devid.gateway.factory.secure_element import SecureElement
    element = SecureElement.of(token.uri, token.so_pin)
    assert token.so_pin not in repr(element) and element.so_pin == token.so_pin


def test_an_interrupted_key_swap_is_finished_by_the_next_command(se_data, token, tmp_path, monkeypatch):
    """The state a kill leaves half-way through the swap of operational keys (made here with the
    token's own calls, in the order the swap goes: certificate, public key, private key): the
    old key's certificate and public key destroyed, its private key still labelled SERIAL-op;
    the new key's certificate and public key relabelled SERIAL-op, its private key still
    SERIAL-op-new. `devid se show` finishes it: every SERIAL-op object is the new key's, none is
    left labelled SERIAL-op-new, and the old private key is gone."""
    from cryptography.hazmat.primitives import serialization
    from devid.gateway.pkcs11 import objects
    from devid.gateway.pkcs11.token import Token, TokenKey
    from devid.gateway.pkcs11.uri import parse
    provision(se_data, token, tmp_path / "f", 1, so=False)
    bundle = tmp_path / "f" / "SN00000001"
    monkeypatch.setenv("DEVID_PKCS11_PIN", token.pin)
    t = Token.of(parse(token.uri))
    reg = se_data.open_registry()
    try:
        ca = se_data.authority(reg)
        certs = {}
        for kid, label in ((b"old-op", "SN00000001-op"), (b"new-op", "SN00000001-op-new")):
            public = t.generate_ec_key(ec.SECP256R1(), label, kid)
            csr = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")]))
                   .sign(TokenKey(t, kid, label, public), hashes.SHA256()))
            issued = ca.issue_operational(csr.public_bytes(serialization.Encoding.DER), "SN00000001", NOW)
            certs[kid] = issued.cert
            t.store_certificate(issued.cert.public_bytes(serialization.Encoding.DER), label, kid,
                                subject=issued.cert.subject.public_bytes())
    finally:
        reg.close()
    (bundle / "op-cert.pem").write_bytes(certs[b"new-op"].public_bytes(serialization.Encoding.PEM))
    objects.destroy(t, b"old-op", classes=("CERTIFICATE", "PUBLIC_KEY"))
    objects.relabel(t, b"new-op", "SN00000001-op", classes=("CERTIFICATE", "PUBLIC_KEY"))
    se(token, "show", "--device", bundle, "--json")
    for cls in objects.ALL_CLASSES:
        assert objects.ids_labelled(t, "SN00000001-op", cls) == [b"new-op"], cls
        assert objects.ids_labelled(t, "SN00000001-op-new", cls) == [], cls
    assert objects.ids_labelled(t, "SN00000001-op", "CERTIFICATE") == [b"new-op"]


def test_a_wrong_so_pin_is_one_line_without_either_pin(se_data, token, tmp_path):
    env = {**token.env, "DEVID_PKCS11_SO_PIN": token.so_pin + "0"}
    proc = run_devid("provision", "--count", 1, "--device-type", "temperature-sensor", "--out", tmp_path / "f",
                     "--secure-element", token.uri, data_dir=se_data.path, env=env)
    err = one_line_error(proc, "wrong SO PIN")
    assert token.pin not in err and token.so_pin not in err
    assert key_labels(token) == set() and not list((tmp_path / "f").glob("SN*"))
