"""Log lines that machines read (docs/gateway.md#logs): every line one JSON object, and every
event the docs show is triggered here against the real gateway, parsed, and compared with the
docs' example line (same logger, level, event, result and the same fields)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers import codes

from devid.ca.revocation import revoke_device
from devid.gateway.service.anomalies import AnomalySettings
from devid.gateway.service.budgets import Budgets, Rate
from devid.gateway.device.client import device_context
from devid.gateway.device.enroll import enroll, fetch_config, renew
from devid.gateway.system.logs import LineFormatter
from devid.gateway.factory.provisioning import provision
from devid.gateway.app.server import POLICY_FILE
from devid.gateway.store.storage import StorageHealth

from .conftest import NOW, free_port, make_csr, tool
from .dtls_helpers import RawCoapOverDTLS
from .gateway_helpers import FW, POLICY, run_with_gateway

DOCS = Path(__file__).resolve().parent.parent / "docs" / "gateway.md"
HEAD = ("time", "level", "logger", "event")


def documented_lines() -> list[dict]:
    """The example lines of docs/gateway.md "## Logs", parsed."""
    text = DOCS.read_text()
    section = text[text.index("\n## Logs\n"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    return [json.loads(line) for block in blocks for line in block.splitlines() if line.strip()]


@pytest.fixture
def captured():
    """Every log record, as the real formatter writes it, in a buffer (as `devid serve` sets up)."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(LineFormatter())
    root, devid = logging.getLogger(), logging.getLogger("devid")
    saved = root.level, devid.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    devid.setLevel(logging.INFO)

    def lines() -> list[dict]:
        handler.flush()
        return [json.loads(line) for line in buffer.getvalue().splitlines()]
    yield lines
    root.removeHandler(handler)
    root.setLevel(saved[0])
    devid.setLevel(saved[1])


def _key(line: dict) -> tuple:
    return line["logger"], line["level"], line["event"], line.get("result")


async def _request(ctx, uri, code=codes.GET, **kw):
    return await asyncio.wait_for(ctx.request(aiocoap.Message(code=code, uri=uri, **kw)).response, 15)


async def _with(directory: Path, uri: str, *requests, op: bool = False) -> list:
    names = {"cert_name": "op-chain.pem", "key_name": "op-key.pem"} if op else {}
    ctx, _ = await device_context(directory, "127.0.0.1", **names)
    try:
        return [await _request(ctx, uri + path, code, **kw) for path, code, kw in requests]
    finally:
        await ctx.shutdown()


def sha1_csr(tmp_path: Path) -> bytes:
    """A DER CSR signed with SHA-1, by openssl (cryptography refuses to make one)."""
    key = tmp_path / "sha1-key.pem"
    subprocess.run([tool("openssl"), "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
                   check=True, capture_output=True, timeout=30)
    proc = subprocess.run([tool("openssl"), "req", "-new", "-sha1", "-key", str(key), "-subj", "/CN=x",
                           "-outform", "DER"], check=True, capture_output=True, timeout=30)
    return proc.stdout


SHA1_REFUSED = "CSR is signed with SHA-1, a hash the CA refuses (sign with SHA-256, SHA-384, SHA-512)"


def trigger_every_event(data, ca, tmp_path) -> None:
    """Each event of docs/gateway.md#logs, once at least, against the real gateway."""
    run_with_gateway(data, lambda uri, gw: asyncio.sleep(0))            # no policy yet: "policy" "missing"
    (data.path / POLICY_FILE).write_text(POLICY)
    out = tmp_path / "factory"
    provision(ca, count=4, device_type="temperature-sensor", out=out, serial_prefix="TS", now=lambda: NOW,
              manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"))
    one, two, three, four = (out / f"TS0000000{i}" for i in (1, 2, 3, 4))
    csr = {"payload": make_csr()[0], "content_format": 286}
    refused_csr = {"payload": sha1_csr(tmp_path), "content_format": 286}
    template = data.path / "config" / "temperature-sensor.toml"

    async def body(uri, gw):
        await enroll(one, uri, FW)          # handshake ok, nonce, evidence, enroll, config; session-closed
        await renew(one, uri)               # renew issued
        await fetch_config(one, uri)
        # a broken configuration template: 5.03 to the device, "config" "failed" in the log
        template.write_text("[endpoints\n")
        answers = await _with(one, uri, ("/config", codes.GET, {}), op=True)
        assert [a.code for a in answers] == [codes.SERVICE_UNAVAILABLE]
        template.unlink()
        # a CSR the CA refuses (signed with SHA-1): 4.00, and an "enroll" "refused" line with the CA's reason
        answers = await _with(two, uri, ("/.well-known/est/sen", codes.POST, refused_csr))
        assert [a.code for a in answers] == [codes.BAD_REQUEST]
        # a DTLS record whose plaintext is not CoAP (option delta 15 is reserved): "unparsable", and a Reset
        async with RawCoapOverDTLS(three, int(uri.rsplit(":", 1)[1])) as raw:
            reset = await raw.exchange(b"\x40\x01\x12\x36\xf1x")
            assert reset is not None and reset.mtype == aiocoap.RST and reset.mid == 0x1236
        # refusals: each action with the wrong identity
        answers = await _with(two, uri, ("/.well-known/est/sen", codes.POST, csr),       # no verdict
                              ("/.well-known/est/sren", codes.POST, csr), ("/config", codes.GET, {}),
                              *[("/attest/nonce", codes.GET, {})] * 3)     # a budget of 2 (below)
        assert [a.code for a in answers] == [codes.FORBIDDEN] * 3 + [codes.CONTENT] * 2 + [codes.TOO_MANY_REQUESTS]
        answers = await _with(one, uri, ("/attest/nonce", codes.GET, {}),
                              ("/attest/evidence", codes.POST, {"payload": b"\xa0", "content_format": 60}), op=True)
        assert [a.code for a in answers] == [codes.FORBIDDEN] * 2
        revoke_device(gw.registry, "TS00000004", "keyCompromise", NOW)
        with pytest.raises(Exception):      # handshake refused (the device is revoked): the client gives up
            await _with(four, uri, ("/attest/nonce", codes.GET, {}))
        # the policy read again (SIGHUP calls this): a bad file is refused, a good one taken
        policy = data.path / POLICY_FILE
        policy.write_text(POLICY + "\n[device_types.x]\nattestation = 'sometimes'\n")
        assert not gw.reload_policy("signal")
        policy.write_text(POLICY)
        assert gw.reload_policy("signal")
        # a verdict below affirming for TS00000001, whose last one (at enrollment) was affirming:
        # given to the tracker directly (tests/test_anomalies.py sends the evidence for it)
        gw.anomalies.verdict("TS00000001", "contraindicated", None)
    # nonces: TS00000001 spends one enrolling, one refused with its operational identity.
    # Anomaly thresholds this low make the requests above raise each kind: TS00000002's three
    # refusals, TS00000001's renewal, and every device's first address
    run_with_gateway(data, body, budgets=Budgets(nonce=Rate(2, 600.0)),
                     anomalies=AnomalySettings(refusals=3, renewals=1, addresses=1))
    # storage: the registry's health tracker on the gateway's logger (the real disk-full path runs in
    # tests/test_disk_full.py, which reads these lines from `devid serve`'s log)
    health = StorageHealth(logging.getLogger("devid.gateway"), str(data.path / "registry.sqlite3"))
    health.failed("full", sqlite3.OperationalError("database or disk is full"))
    health.succeeded()


def test_every_documented_event_is_one_json_line_with_the_documented_fields(data, ca, tmp_path, captured):
    trigger_every_event(data, ca, tmp_path)
    lines = captured()
    assert lines
    for line in lines:
        assert tuple(line)[:4] == HEAD, line            # the head first, in this order
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line
        assert None not in line.values(), line
    seen = {_key(line): set(line) for line in lines if line["logger"].startswith("devid")}
    for example in documented_lines():
        assert _key(example) in seen, f"documented but not logged: {example}"
        # the same fields as the example (optional ones the example leaves out may be there too)
        assert set(example) <= seen[_key(example)] | {"worker"}, (example, seen[_key(example)])
    text = "\n".join(json.dumps(line) for line in lines)
    assert "PRIVATE KEY" not in text and "Traceback" not in text
    # the CSR refusal the docs show is the CA's own message, as logged
    logged = {line.get("reason") for line in lines if _key(line)[2:] == ("enroll", "refused")}
    shown = {ex.get("reason") for ex in documented_lines() if _key(ex)[2:] == ("enroll", "refused")}
    assert SHA1_REFUSED in logged and SHA1_REFUSED in shown


def test_the_docs_name_exactly_the_events_the_gateway_logs(data, ca, tmp_path, captured):
    """The set of (event, result) the docs show equals the set triggered above: docs cannot drift."""
    trigger_every_event(data, ca, tmp_path)
    logged = {_key(line) for line in captured() if line["logger"].startswith("devid")}
    documented = {_key(example) for example in documented_lines()}
    assert documented == logged


def test_serve_writes_json_lines_to_the_log_file_with_the_worker(data, tmp_path):
    """`devid serve --workers 2 --log-file`: the file gets one JSON object per line, each worker's
    with its index; stderr gets no log lines."""
    log = tmp_path / "gateway.log"
    log.write_text("")          # appended to, not replaced
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data.path)
    serve = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", f"127.0.0.1:{free_port()}",
                              "--workers", "2", "--log-file", str(log)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        first = serve.stdout.readline().decode()
        assert "listening" in first, first + serve.stderr.read1().decode()
        serve.terminate()
        assert serve.wait(30) == 0
        assert serve.stderr.read().decode() == ""
    finally:
        if serve.poll() is None:
            serve.kill()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    missing = [line for line in lines if line["event"] == "policy"]
    assert {line["worker"] for line in missing} == {0, 1}
    assert all(line["result"] == "missing" and line["level"] == "WARNING" and line["logger"] == "devid.gateway"
               for line in missing)


def test_an_unwritable_log_file_is_one_error_line(data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data.path)
    proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "serve", "--log-file", str(tmp_path / "no" / "x.log")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "--log-file" in proc.stderr, proc.stderr
