"""Issue 12, item 16: one --json convention (docs/cli.md). Every command that has --json runs here,
good and bad, as a real process (the device commands against a real `devid serve`): stdout is
exactly one JSON document on one line, with "ok"; a failure is {"ok": false, "error": ...} with
the exit status of the same command without --json, and its one error line on stderr."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from devid.gateway.app.datadir import DataDir
from devid.gateway.cli.dispatch import build_parser

from .conftest import free_port, make_csr, run_devid, tool

FIRMWARE = b"devid json test firmware 1.0.0\n"
POLICY = """version = 1
[device_types.temperature-sensor]
attestation = "required"
accept = "affirming"
[[device_types.temperature-sensor.firmware]]
name = "fw"
version = "1.0.0"
digest = "sha-256:{digest}"
"""


def _no_constants(name: str):
    raise AssertionError(f"{name} is not JSON")


def _document(proc) -> dict:
    """Exactly one JSON document, one line, nothing else on stdout (json.loads refuses anything
    after the document, and NaN or Infinity here)."""
    out = proc.stdout.decode()
    assert out.endswith("\n") and out.count("\n") == 1, out
    doc = json.loads(out, parse_constant=_no_constants)
    assert isinstance(doc, dict) and isinstance(doc.get("ok"), bool), doc
    return doc


def _commands_with_json() -> set[tuple[str, ...]]:
    found = set()

    def walk(parser, prefix=()):
        if any("--json" in a.option_strings for a in parser._actions):
            found.add(prefix)
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    walk(sub, (*prefix, name))
    walk(build_parser())
    return found | {("bench",)}          # bench's options are its own parser's (benchmarks/bench_cli.py)


class Runner:
    """Runs devid commands with --json on one data directory, and records which were seen succeed
    and fail."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.good: set[tuple[str, ...]] = set()
        self.bad: set[tuple[str, ...]] = set()
        self.known = _commands_with_json()

    def _path(self, args) -> tuple[str, ...]:
        words = [a for a in map(str, args) if not a.startswith("-")]
        for n in range(len(words), 0, -1):
            if tuple(words[:n]) in self.known:
                return tuple(words[:n])
        raise AssertionError(f"not a command with --json: {args}")

    def good_(self, *args, data: Path | None = None) -> dict:
        proc = run_devid(*args, "--json", data_dir=data or self.data)
        assert proc.returncode == 0, proc.stderr.decode()
        doc = _document(proc)
        assert doc["ok"] is True, doc
        self.good.add(self._path(args))
        return doc

    def bad_(self, *args, code: int = 1, data: Path | None = None) -> dict:
        proc = run_devid(*args, "--json", data_dir=data or self.data)
        doc = _document(proc)
        err = proc.stderr.decode()
        assert proc.returncode == code, (proc.returncode, err)
        assert doc["ok"] is False and isinstance(doc["error"], str) and doc["error"], doc
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and doc["error"] in err, err
        plain = run_devid(*args, data_dir=data or self.data)        # the same exit status without --json
        assert plain.returncode == code and plain.stderr.decode() == err, plain.stderr.decode()
        self.bad.add(self._path(args))
        return doc


def _serial(pem_path: Path) -> str:
    proc = subprocess.run([tool("openssl"), "x509", "-in", str(pem_path), "-noout", "-serial"], capture_output=True)
    return proc.stdout.decode().strip().removeprefix("serial=")


def _serve(data: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    proc = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", f"127.0.0.1:{port}",
                             "--workers", "1"], stdout=subprocess.PIPE, stderr=open(log, "wb"),
                            env={**env, "DEVID_DATA": str(data)})
    line = proc.stdout.readline().decode()
    if "listening" not in line:
        proc.kill()
        raise AssertionError(f"devid serve did not start: {line!r} {log.read_text()}")
    return proc, f"coaps://127.0.0.1:{port}"


def test_every_command_prints_one_json_document_good_and_bad(tmp_path, postgres, token, monkeypatch):
    d = tmp_path / "data"
    run = Runner(d)
    run.bad_("devices", "list")                                         # no data directory yet
    doc = run.good_("init", "--hostname", "gw.example.net", "--org", 'Q "JSON" Ltd')
    assert set(doc["certificates"]) == {"root", "manufacturing", "operational", "gateway"}
    assert doc["certificates"]["root"]["serial"] == _serial(d / "ca" / "root.cert.pem")
    assert doc["passphrase"] == {"source": "generated", "file": str(d / "ca" / "passphrase")}
    run.bad_("init")                                                    # a CA exists
    run.bad_("init", "--hostname", "bad name!", code=2)
    doc = run.good_("ca", "cert", "gateway")
    assert x509.load_pem_x509_certificate(doc["pem"].encode()).subject.rfc4514_string() == doc["subject"]
    run.bad_("ca", "cert", "nosuch", code=2)

    out = tmp_path / "factory"
    doc = run.good_("provision", "--count", "4", "--device-type", "temperature-sensor", "--out", out,
                    "--serial-prefix", "TS")
    assert (doc["count"], doc["first_serial"], doc["last_serial"]) == (4, "TS00000001", "TS00000004")
    run.bad_("provision", "--count", "0", "--device-type", "t", "--out", out, code=2)
    run.bad_("provision", "--count", "1", "--device-type", "Bad Type", "--out", out)
    doc = run.good_("devices", "list")
    assert [x["serial"] for x in doc["devices"]] == [f"TS0000000{i}" for i in range(1, 5)]
    assert doc["registry"] == {"manufactured": 4, "enrolled": 0, "revoked": 0}
    run.bad_("devices", "list", "--limit", "0", code=2)
    doc = run.good_("devices", "show", "TS00000001")
    assert doc["certificates"][0]["serial"] == _serial(out / "TS00000001" / "cert.pem")
    run.bad_("devices", "show", "NOSUCH1")

    (tmp_path / "op.csr").write_bytes(make_csr()[0])
    (tmp_path / "bad.csr").write_bytes(b"not a csr")
    doc = run.good_("ca", "sign-csr", "--profile", "operational", "--device", "TS00000004", "--csr", tmp_path / "op.csr",
                    "--out", tmp_path / "op.pem")
    assert doc["out"] == str(tmp_path / "op.pem") and "pem" not in doc
    assert doc["certificate"]["serial"] == _serial(tmp_path / "op.pem")
    run.bad_("ca", "sign-csr", "--profile", "operational", "--device", "TS00000004", "--csr", tmp_path / "bad.csr")
    doc = run.good_("ca", "verify", tmp_path / "op.pem", "--profile", "operational")
    assert doc["valid"] is True and doc["certificate_serial"] == _serial(tmp_path / "op.pem")
    doc = run.bad_("ca", "verify", tmp_path / "op.pem")                  # an operational certificate as factory
    assert doc["valid"] is False and doc["certificate"]["serial"] == _serial(tmp_path / "op.pem")
    assert run.bad_("ca", "verify", tmp_path / "bad.csr")["valid"] is False

    digest = hashlib.sha256(FIRMWARE).hexdigest()
    (d / "attestation-policy.toml").write_text(POLICY.format(digest=digest))
    (tmp_path / "fw.bin").write_bytes(FIRMWARE)
    (tmp_path / "other.bin").write_bytes(b"something else")
    doc = run.good_("attest", "policy", "check")
    assert list(doc["device_types"]) == ["temperature-sensor"]
    run.bad_("attest", "policy", "check", tmp_path / "nosuch.toml")

    serve, uri = _serve(d, tmp_path / "serve.log")
    try:
        fw = ["--firmware-name", "fw", "--firmware-version", "1.0.0"]
        doc = run.good_("enroll", "--gateway", uri, "--device", out / "TS00000001", "--firmware", tmp_path / "fw.bin", *fw)
        assert doc["serial"] == "TS00000001" and doc["verdict"] == "affirming"
        assert doc["certificate_serial"] == _serial(out / "TS00000001" / "op-cert.pem")
        doc = run.bad_("enroll", "--gateway", uri, "--device", out / "TS00000002", "--firmware",
                       tmp_path / "other.bin", *fw)
        assert doc["step"] == "evidence" and doc["reason"]
        doc = run.good_("renew", "--gateway", uri, "--device", out / "TS00000001")
        assert doc["serial"] == "TS00000001"
        assert doc["certificate_serial"] == _serial(out / "TS00000001" / "op-cert.pem")
        assert run.bad_("renew", "--gateway", uri, "--device", out / "TS00000003")["step"] == "bundle"
        doc = run.good_("fetch-config", "--gateway", uri, "--device", out / "TS00000001")
        assert doc["device_type"] and doc["trust_anchors"] >= 1 and doc["config"].endswith("config.cbor")
        assert run.bad_("fetch-config", "--gateway", uri, "--device", out / "TS00000003")["step"] == "bundle"
        doc = run.good_("agent", "--once", "--gateway", uri, "--device", out / "TS00000001")
        assert doc["renewed"] is False and doc["threshold_source"] == "configuration"
        assert run.bad_("agent", "--once", "--gateway", uri, "--device", out / "TS00000003")["step"] == "bundle"
        sim = tmp_path / "sim"
        sim.mkdir()
        shutil.copytree(out / "TS00000003", sim / "TS00000003")
        doc = run.good_("simulate", "--gateway", uri, "--devices", sim, "--firmware", tmp_path / "fw.bin", *fw)
        assert (doc["devices"], doc["enrolled"], doc["errors"], doc["failures"]) == (1, 1, 0, {})
        doc = run.bad_("simulate", "--gateway", uri, "--devices", sim, "--firmware", tmp_path / "other.bin", *fw)
        assert doc["errors"] == 1 and list(doc["failures"]) == ["TS00000003"]
        assert doc["latency_ms"]["p50"] is None           # no enrollment, no latency: null, never NaN
        run.bad_("simulate", "--gateway", uri, "--devices", tmp_path / "empty")
    finally:
        serve.terminate()
        serve.wait(60)
    reg = DataDir(d).open_registry(readonly=True)
    try:
        assert reg.count_certificates("operational") == 4     # sign-csr, enroll, renew, simulate
    finally:
        reg.close()

    doc = run.good_("revoke", "TS00000001", "--reason", "keyCompromise")
    assert doc["already_revoked"] is False and len(doc["newly_revoked"]) == 3
    assert run.good_("revoke", "TS00000001")["already_revoked"] is True
    run.bad_("revoke", "NOSUCH1")
    doc = run.good_("revoke", "--certificate", _serial(tmp_path / "op.pem"))
    assert doc["certificate"]["device"] == "TS00000004" and doc["device_state"] == "enrolled"
    run.bad_("revoke", "--certificate", "zz")
    run.bad_("revoke", code=2)
    doc = run.good_("crl")
    assert [c["ca"] for c in doc["crls"]] == ["root", "manufacturing", "operational"] and "pem" not in doc
    doc = run.good_("crl", "--ca", "operational", "--out", "-")
    assert doc["pem"].startswith("-----BEGIN X509 CRL-----") and doc["crls"][0]["revoked"] == 3
    run.bad_("crl", "--ca", "nosuch", code=2)

    doc = run.good_("attest", "log")
    entries = doc["entries"]
    assert entries[0]["device"] == "TS00000001" and entries[0]["tier"] == "affirming"
    assert {e["device"] for e in entries} == {"TS00000001", "TS00000002", "TS00000003"}
    run.bad_("attest", "log", "--since", "yesterday", code=2)
    doc = run.good_("attest", "log", "rotate")
    assert doc["segments"] == []                          # everything is inside the verdict window
    run.bad_("attest", "log", "rotate", "--segment-entries", "0", code=2)
    doc = run.good_("attest", "verify-log")
    assert doc["entries"] == len(entries) and doc["problems"] == []
    run.bad_("attest", "verify-log", "--segments", tmp_path / "nosuch")
    doc = run.good_("registry", "check")
    assert doc["engine"] == "sqlite" and all(c["ok"] for c in doc["checks"])
    run.bad_("registry", "check", "--segments", tmp_path / "nosuch")
    doc = run.good_("registry", "migrate", "--to", postgres.new_schema("json"))
    assert doc["tables"]["devices"]["rows"] == 4 and doc["switched"] is False
    run.bad_("registry", "migrate", "--to", "sqlite:///nosuch")

    demo = tmp_path / "demo"
    doc = run.good_("demo", "--count", "2", data=demo)
    assert doc["created_ca"] is True and [x["state"] for x in doc["devices"]] == ["enrolled", "revoked"]
    assert doc["renewed"]["certificate_serial"] == _serial(demo / "devices" / "DEMO00000001" / "op-cert.pem")
    assert doc["revoked"]["refused"]["step"]
    run.bad_("demo", "--count", "0", code=2, data=demo)

    doc = run.good_("bench", "--devices", "2", "--concurrency", "1", "--clients", "1", "--workers", "1",
                    "--no-baselines")
    assert doc["enroll"]["done"] == 2 and doc["enroll"]["errors"] == 0
    run.bad_("bench", "--data", tmp_path, code=2)
    run.bad_("bench", "--gateway", uri, "--data", tmp_path / "nosuch")

    # a device whose keys are in a secure element (a SoftHSM2 token): devid se
    import cbor2
    monkeypatch.setenv("DEVID_PKCS11_PIN", token.pin)
    se_out = tmp_path / "se"
    run.good_("provision", "--count", "1", "--device-type", "temperature-sensor", "--serial-prefix", "SE", "--out",
              se_out, "--secure-element", token.uri)
    dev = se_out / "SE00000001"
    assert run.good_("se", "show", "--device", dev)["factory_key"]["never_extractable"] is True
    run.bad_("se", "show", "--device", tmp_path / "nosuch")
    nonce = tmp_path / "nonce.cbor"
    nonce.write_bytes(cbor2.dumps({"nonce": bytes(16)}))
    fw = ["--firmware-digest", hashlib.sha256(FIRMWARE).hexdigest(), "--firmware-name", "fw", "--firmware-version",
          "1.0.0"]
    assert run.good_("se", "evidence", "--device", dev, "--nonce", nonce, *fw, "--out", tmp_path / "ev.cose")["bytes"]
    run.bad_("se", "evidence", "--device", dev, "--nonce", tmp_path / "nosuch", *fw, "--out", tmp_path / "ev.cose")
    assert run.good_("se", "csr", "--device", dev, "--out", tmp_path / "se.csr")["key_label"] == "SE00000001-op-new"
    run.bad_("se", "csr", "--device", dev, "--nonce", nonce, "--out", tmp_path / "se.csr")     # no firmware
    assert run_devid("ca", "sign-csr", "--profile", "operational", "--device", "SE00000001", "--csr",
                     tmp_path / "se.csr", "--out", tmp_path / "se-op.pem", data_dir=d).returncode == 0
    (tmp_path / "se-op-chain.pem").write_bytes((tmp_path / "se-op.pem").read_bytes() +
                                               (d / "ca" / "operational.cert.pem").read_bytes())
    assert run.good_("se", "store", "--device", dev, "--cert", tmp_path / "se-op-chain.pem")["key_label"] == \
        "SE00000001-op"
    run.bad_("se", "store", "--device", dev, "--cert", d / "ca" / "operational.cert.pem")

    # service access over MQTT: a real Mosquitto on the files broker-config writes
    from .mosquitto_helpers import Mosquitto
    broker = Mosquitto()
    try:
        doc = run.good_("mqtt", "broker-config", "--out", broker.directory, "--port", broker.port, "--listen",
                        "127.0.0.1", "--owner", "mosquitto")
        assert doc["port"] == broker.port and doc["acl_devices"] == 0     # the default template has no [mqtt]
        run.bad_("mqtt", "broker-config", "--out", broker.directory, "--owner", "no-such-user-here")
        (d / "config" / "default.toml").write_text((d / "config" / "default.toml").read_text()
                                                    + f'\n[mqtt]\nbroker = "mqtts://localhost:{broker.port}"\n')
        assert run.good_("mqtt", "broker-config", "--out", broker.directory, "--port", broker.port, "--listen",
                         "127.0.0.1", "--owner", "mosquitto")["acl_devices"] >= 1
        assert "user device-TS00000003\n" in (broker.directory / "acl").read_text()     # (TS00000001 is revoked)
        broker.start()
        dev1, url = tmp_path / "sim" / "TS00000003", f"mqtts://localhost:{broker.port}"     # enrolled by simulate
        assert run.good_("mqtt", "publish", "--device", dev1, "--broker", url, "--topic", "t", "--message", "m")["bytes"] == 1
        run.bad_("mqtt", "publish", "--device", dev1, "--broker", "mqtts://localhost:1", "--topic", "t", "--message", "m")
        assert run.good_("mqtt", "publish", "--device", dev1, "--broker", url, "--topic", "news", "--message", "hello",
                         "--retain")["topic"] == "devices/TS00000003/news"
        doc = run.good_("mqtt", "subscribe", "--device", dev1, "--broker", url, "--topic", "news")
        assert doc["messages"][0] == {"topic": "devices/TS00000003/news", "message": "hello"}
        run.bad_("mqtt", "subscribe", "--device", out / "TS00000003", "--broker", url, "--topic", "news")
    finally:
        broker.stop()

    # the operator listener's credentials (docs/operations.md): the token itself is not in the JSON
    doc = run.good_("operator", "token")
    assert doc["id"].startswith("token:") and (d / "operator.token").read_text().strip() not in json.dumps(doc)
    run.bad_("operator", "token", data=tmp_path / "nowhere")
    assert run.good_("operator", "cert", "--out", tmp_path / "op", "--name", "alice")["subject"].startswith("CN=alice")
    run.bad_("operator", "cert", "--out", tmp_path / "op", "--name", "alice")          # its files exist

    # every command that has --json was seen both succeed and fail
    assert run.good == run.known and run.bad == run.known, (run.known - run.good, run.known - run.bad)


def test_usage_errors_are_json_documents_too(tmp_path):
    for args in (["frobnicate", "--json"], ["devices", "--json"], ["devices", "list", "--json", "--bogus"],
                 ["--data", tmp_path, "enroll", "--gateway", "coaps://127.0.0.1:1", "--device", tmp_path, "--json"]):
        proc = run_devid(*args)
        assert proc.returncode == 2
        doc = _document(proc)
        assert doc["ok"] is False and doc["error"] in proc.stderr.decode()
    # --help stays text
    proc = run_devid("devices", "list", "--json", "--help")
    assert proc.returncode == 0 and proc.stdout.decode().startswith("usage:")


def test_every_result_command_has_json():
    """Only `serve` (which runs until stopped) and the command groups lack --json."""
    leaves = set()

    def walk(parser, prefix=()):
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs or any(a.option_strings == ["--json"] for a in parser._actions):
            leaves.add(prefix)
        for action in subs:
            for name, sub in action.choices.items():
                walk(sub, (*prefix, name))
    walk(build_parser())
    assert leaves - _commands_with_json() == {("serve",)}
