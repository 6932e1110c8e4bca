"""The `devid` command line, run as a real process: outputs, files, modes, and one-line errors."""

from __future__ import annotations

import json
import os
import stat

import pytest
from cryptography import x509

from .conftest import make_csr, ok, one_line_error, run_devid

pytestmark = pytest.mark.engines


@pytest.fixture
def ddir(tmp_path):
    d = tmp_path / "data"
    ok(run_devid("init", "--hostname", "gw.example.net", "--hostname", "192.0.2.7", data_dir=d))
    return d


def test_init_creates_protected_ca_and_never_overwrites(ddir):
    assert stat.S_IMODE((ddir / "ca").stat().st_mode) == 0o700
    for name in ("root", "manufacturing", "operational", "gateway"):
        assert stat.S_IMODE((ddir / "ca" / f"{name}.key.pem").stat().st_mode) == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in (ddir / "ca" / f"{name}.key.pem").read_bytes()
    assert stat.S_IMODE((ddir / "ca" / "passphrase").stat().st_mode) == 0o600
    before = (ddir / "ca" / "root.cert.pem").read_bytes()
    one_line_error(run_devid("init", data_dir=ddir), "already exists")
    assert (ddir / "ca" / "root.cert.pem").read_bytes() == before


def test_init_with_passphrase_from_environment(tmp_path):
    d = tmp_path / "d"
    env = {"DEVID_CA_PASSPHRASE": "correct horse battery staple"}
    ok(run_devid("init", data_dir=d, env=env))
    assert not (d / "ca" / "passphrase").exists()
    ok(run_devid("provision", "--count", "1", "--device-type", "t", "--out", tmp_path / "o", data_dir=d, env=env))
    one_line_error(run_devid("provision", "--count", "1", "--device-type", "t", "--out", tmp_path / "o",
                             data_dir=d, env={"DEVID_CA_PASSPHRASE": "wrong"}), "wrong passphrase")
    one_line_error(run_devid("provision", "--count", "1", "--device-type", "t", "--out", tmp_path / "o",
                             data_dir=d), "DEVID_CA_PASSPHRASE")


def test_ca_cert_prints_pem(ddir):
    for name in ("root", "manufacturing", "operational", "gateway"):
        cert = x509.load_pem_x509_certificate(run_devid("ca", "cert", name, data_dir=ddir).stdout)
        assert cert.subject.rfc4514_string()
    gw = x509.load_pem_x509_certificate(run_devid("ca", "cert", "gateway", data_dir=ddir).stdout)
    san = gw.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gw.example.net" in san.get_values_for_type(x509.DNSName)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "192.0.2.7"}


def test_data_dir_from_flag_after_the_subcommand(ddir):
    proc = run_devid("ca", "cert", "root", "--data", ddir)
    assert b"BEGIN CERTIFICATE" in proc.stdout


def test_provision_bundle(ddir, tmp_path):
    out = tmp_path / "factory"
    text = ok(run_devid("provision", "--count", "3", "--device-type", "temperature-sensor", "--out", out,
                        "--serial-prefix", "TS", data_dir=ddir))
    assert "provisioned 3 factory identities" in text and "identities/s" in text
    serials = sorted(p.name for p in out.iterdir())
    assert serials == ["TS00000001", "TS00000002", "TS00000003"]
    b = out / "TS00000002"
    assert sorted(p.name for p in b.iterdir()) == ["ca.pem", "cert.pem", "chain.pem", "key.pem",
                                                   "secure-element-config.json"]
    assert stat.S_IMODE((b / "key.pem").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((b / "cert.pem").read_bytes())
    chain = x509.load_pem_x509_certificates((b / "chain.pem").read_bytes())
    assert chain[0] == cert and chain[1] == x509.load_pem_x509_certificate(
        (ddir / "ca" / "manufacturing.cert.pem").read_bytes())
    assert (b / "ca.pem").read_bytes() == (ddir / "ca" / "root.cert.pem").read_bytes()
    se = json.loads((b / "secure-element-config.json").read_text())
    assert se["secure_element"] == {"type": "ATECC608A", "i2c_address": "0x60",
                                    "key_slots": {"device_private_key": 0, "device_certificate": 10,
                                                  "ca_certificate": 11}}
    assert se["provisioning"] == {"lock_configuration": True, "lock_data": True, "enable_hardware_rng": True}
    assert se["certificate"]["serial"] == format(cert.serial_number, "x")
    assert se["device_serial"] == "TS00000002"
    listed = json.loads(ok(run_devid("devices", "list", "--json", data_dir=ddir)))["devices"]
    assert [d["serial"] for d in listed] == serials
    assert {d["state"] for d in listed} == {"manufactured"}
    # rerun: new serials, never a second identity for an existing one
    ok(run_devid("provision", "--count", "2", "--device-type", "temperature-sensor", "--out", out,
                 "--serial-prefix", "TS", data_dir=ddir))
    assert sorted(p.name for p in out.iterdir()) == serials + ["TS00000004", "TS00000005"]
    assert cert == x509.load_pem_x509_certificate((b / "cert.pem").read_bytes())


def test_sign_csr_pem_and_der_and_device_show(ddir, tmp_path):
    out = tmp_path / "f"
    ok(run_devid("provision", "--count", "1", "--device-type", "meter", "--out", out, "--quiet", data_dir=ddir))
    for fmt in ("der", "pem"):
        csr, key = make_csr(der=(fmt == "der"))
        (tmp_path / f"op.{fmt}").write_bytes(csr)
        ok(run_devid("ca", "sign-csr", "--profile", "operational", "--device", "SN00000001",
                     "--csr", tmp_path / f"op.{fmt}", "--out", tmp_path / f"op-{fmt}.pem", data_dir=ddir))
        cert = x509.load_pem_x509_certificate((tmp_path / f"op-{fmt}.pem").read_bytes())
        assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    # to stdout, then verify it with the CLI
    (tmp_path / "c.der").write_bytes(make_csr()[0])
    pem = run_devid("ca", "sign-csr", "--profile", "operational", "--device", "SN00000001",
                    "--csr", tmp_path / "c.der", data_dir=ddir).stdout
    (tmp_path / "last.pem").write_bytes(pem)
    v = json.loads(ok(run_devid("ca", "verify", tmp_path / "last.pem", "--profile", "operational", "--json",
                                data_dir=ddir)))
    assert v["valid"] and v["serial"] == "SN00000001" and v["device_type"] == "meter"
    shown = json.loads(ok(run_devid("devices", "show", "SN00000001", "--json", data_dir=ddir)))
    assert shown["state"] == "enrolled"
    assert [c["status"] for c in shown["certificates"] if c["profile"] == "operational"] == \
        ["superseded", "superseded", "current"]
    table = ok(run_devid("devices", "show", "SN00000001", data_dir=ddir))
    assert "enrolled" in table and "superseded" in table


def test_sign_csr_factory_registers_a_new_device(ddir, tmp_path):
    (tmp_path / "se.csr").write_bytes(make_csr()[0])
    ok(run_devid("ca", "sign-csr", "--profile", "factory", "--device", "SE0001", "--device-type", "gateway-node",
                 "--csr", tmp_path / "se.csr", "--out", tmp_path / "c.pem", data_dir=ddir))
    assert json.loads(ok(run_devid("devices", "show", "SE0001", "--json", data_dir=ddir)))["device_type"] == \
        "gateway-node"
    one_line_error(run_devid("ca", "sign-csr", "--profile", "factory", "--device", "SE0001", "--device-type",
                             "gateway-node", "--csr", tmp_path / "se.csr", data_dir=ddir), "already registered")


def test_revoke_and_crl(ddir, tmp_path):
    ok(run_devid("provision", "--count", "2", "--device-type", "t", "--out", tmp_path / "f", "--quiet",
                 data_dir=ddir))
    text = ok(run_devid("revoke", "SN00000002", "--reason", "keyCompromise", data_dir=ddir))
    assert "1 certificate(s) newly revoked" in text
    assert json.loads(ok(run_devid("devices", "show", "SN00000002", "--json", data_dir=ddir)))["state"] == "revoked"
    assert [d["serial"] for d in
            json.loads(ok(run_devid("devices", "list", "--state", "revoked", "--json", data_dir=ddir)))["devices"]] == \
        ["SN00000002"]
    text = ok(run_devid("crl", "--out", tmp_path / "crls.pem", data_dir=ddir))
    assert "manufacturing" in text and "operational" in text
    crls = {c.issuer.rfc4514_string(): c for c in
            (x509.load_pem_x509_crl(b"-----BEGIN X509 CRL-----" + part)
             for part in (tmp_path / "crls.pem").read_bytes().split(b"-----BEGIN X509 CRL-----")[1:])}
    mfg = [c for name, c in crls.items() if "Manufacturing" in name][0]
    revoked_cert = x509.load_pem_x509_certificate((tmp_path / "f" / "SN00000002" / "cert.pem").read_bytes())
    assert mfg.get_revoked_certificate_by_serial_number(revoked_cert.serial_number) is not None
    assert len(crls) == 3
    assert (ddir / "crl" / "manufacturing.crl.pem").exists()
    # a revoked device's certificate no longer verifies
    one_line_error(run_devid("ca", "verify", tmp_path / "f" / "SN00000002" / "cert.pem", data_dir=ddir), "revoked")
    ok(run_devid("ca", "verify", tmp_path / "f" / "SN00000001" / "chain.pem", data_dir=ddir))


def test_insecure_key_file_makes_every_command_refuse(ddir, tmp_path):
    key = ddir / "ca" / "operational.key.pem"
    os.chmod(key, 0o644)
    for args in (("ca", "cert", "root"), ("devices", "list"), ("crl",),
                 ("provision", "--count", "1", "--device-type", "t", "--out", tmp_path / "o")):
        one_line_error(run_devid(*args, data_dir=ddir), "operational.key.pem", "chmod 600")
    os.chmod(key, 0o600)
    os.chmod(ddir / "ca" / "passphrase", 0o640)
    one_line_error(run_devid("devices", "list", data_dir=ddir), "passphrase")
    os.chmod(ddir / "ca" / "passphrase", 0o600)
    ok(run_devid("devices", "list", data_dir=ddir))


@pytest.mark.parametrize("args,needle", [
    (("ca", "sign-csr", "--profile", "operational", "--device", "SN00000001", "--csr", "/nonexistent.csr"),
     "cannot read CSR"),
    (("ca", "sign-csr", "--profile", "operational", "--device", "NOPE", "--csr", "GOOD"), "unknown device NOPE"),
    (("ca", "sign-csr", "--profile", "operational", "--device", "SN00000001", "--csr", "BAD"), "malformed CSR"),
    (("ca", "sign-csr", "--profile", "operational", "--device", "bad serial!", "--csr", "GOOD"),
     "invalid device serial"),
    (("devices", "show", "NOPE"), "unknown device"),
    (("revoke", "NOPE"), "unknown device"),
    (("revoke", "SN00000001", "--reason", "bored"), "invalid choice"),
    (("provision", "--count", "0", "--device-type", "t", "--out", "OUT"), "at least 1"),
    (("provision", "--count", "1", "--device-type", "Bad Type", "--out", "OUT"), "invalid device type"),
    (("ca", "verify", "BAD"), "not a PEM or DER certificate"),
    (("frobnicate",), "invalid choice"),
])
def test_bad_input_is_one_clear_line(ddir, tmp_path, args, needle):
    ok(run_devid("provision", "--count", "1", "--device-type", "t", "--out", tmp_path / "f", "--quiet",
                 data_dir=ddir))
    (tmp_path / "good.csr").write_bytes(make_csr()[0])
    (tmp_path / "bad.csr").write_bytes(b"not a csr at all")
    subst = {"GOOD": tmp_path / "good.csr", "BAD": tmp_path / "bad.csr", "OUT": tmp_path / "o"}
    before = ok(run_devid("devices", "list", "--json", data_dir=ddir))
    one_line_error(run_devid(*[subst.get(a, a) for a in args], data_dir=ddir), needle)
    assert ok(run_devid("devices", "list", "--json", data_dir=ddir)) == before   # nothing lost or changed


def test_missing_data_directory(tmp_path):
    one_line_error(run_devid("devices", "list", data_dir=tmp_path / "nowhere"), "does not exist", "devid init")


def test_help_for_every_command():
    for args in ((), ("init",), ("ca",), ("ca", "sign-csr"), ("provision",), ("devices", "list"), ("crl",),
                 ("revoke",), ("demo",)):
        proc = run_devid(*args, "--help")
        assert proc.returncode == 0 and b"usage:" in proc.stdout


def test_demo_runs_end_to_end(tmp_path):
    d = tmp_path / "demo"
    text = ok(run_devid("demo", "--count", "3", data_dir=d))
    assert "creating one" in text and "registry totals: 2 enrolled, 1 revoked" in text
    # service access: each device published over MQTT to a real Mosquitto, the first read its
    # message back, and the broker refused the revoked one once the gateway republished the CRL
    for n in (1, 2, 3):
        assert f"DEMO0000000{n}: published to devices/DEMO0000000{n}/telemetry" in text
    assert "and received it back" in text and "MQTT broker stopped" in text
    # the broker refused the revoked device's certificate (not merely a broker that was down), while
    # the renewed device still publishes
    assert "refused by the broker: the broker at mqtts://localhost:" in text
    assert "closed the connection before CONNACK" in text or "refused the TLS handshake" in text
    assert "DEMO00000001, renewed, still publishes to devices/DEMO00000001/telemetry" in text
    text = ok(run_devid("demo", "--count", "2", "--no-mqtt", data_dir=d))     # second run reuses the CA
    assert "creating one" not in text and "registry totals: 3 enrolled, 2 revoked" in text
    assert "MQTT skipped: --no-mqtt given" in text and "published" not in text


def test_demo_json_reports_the_mqtt_part(tmp_path):
    doc = json.loads(ok(run_devid("demo", "--count", "2", "--json", data_dir=tmp_path / "demo")))
    assert doc["ok"] is True and doc["mqtt"]["broker"].startswith("mqtts://localhost:")
    assert [p["serial"] for p in doc["mqtt"]["published"]] == ["DEMO00000001", "DEMO00000002"]
    assert "closed the connection before CONNACK" in doc["revoked"]["broker_refused"] or \
        "refused the TLS handshake" in doc["revoked"]["broker_refused"]
    assert doc["revoked"]["control"] == {"serial": "DEMO00000001", "topic": "devices/DEMO00000001/telemetry"}
