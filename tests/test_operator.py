"""The operator listener (`devid serve --http`, docs/operations.md) against the real gateway: a
`devid serve` subprocess with devices enrolled over DTLS, asked over HTTP. Each endpoint with and
without a credential, the token file and its rotation, problem details, keyset paging, and
revocation through the API refusing the device at the gateway."""

from __future__ import annotations

import asyncio
import base64
import json
import stat

import pytest
from cryptography import x509

from devid.gateway.device.enroll import renew
from devid.gateway.device.protocol import EnrollFailed
from devid.gateway.operator.tokens import token_id

from .conftest import run_devid
from .operator_helpers import call, enroll_devices, make_fleet, start

PROBLEM = "application/problem+json"
READS = ["/api/v1/devices", "/api/v1/devices/TS00000001", "/api/v1/devices/TS00000001/certificates",
         "/api/v1/devices/TS00000001/attestations", "/api/v1/attestation-log",
         "/api/v1/attestation-log/verification", "/api/v1/certificates/expiring", "/api/v1/overview", "/metrics"]
WRITES = ["/api/v1/devices/TS00000002/revoke", "/api/v1/certificates/00/revoke"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("operator")
    data, factory = make_fleet(root)
    s = start(data, factory, root / "serve.log")
    try:
        enroll_devices(s, "TS00000001", "TS00000003", "TS00000005")
        yield s
    finally:
        assert s.stop() == 0
        assert "Traceback" not in s.log.read_text()


def problem(answer, status: int, kind: str) -> dict:
    assert answer.status == status, (answer.status, answer.body)
    assert answer.content_type == PROBLEM, answer.headers
    doc = answer.json
    assert doc["type"].endswith("/" + kind) and doc["status"] == status and doc["title"] and doc["detail"], doc
    return doc


def test_the_token_file_is_0600_and_printed_the_same_each_time(served):
    path = served.data.path / "operator.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = run_devid("operator", "token", "--json", data_dir=served.data.path, check=True)
    doc = json.loads(again.stdout)
    assert doc["created"] is False and doc["id"] == token_id(served.token) and served.token not in again.stdout.decode()
    assert run_devid("operator", "token", data_dir=served.data.path, check=True).stdout.decode().strip() == served.token
    assert served.token not in served.log.read_text()       # never logged


def _auth_lines(served) -> list[dict]:
    return [line for line in map(json.loads, filter(lambda x: x.startswith("{"), served.log.read_text().splitlines()))
            if line["logger"] == "devid.operator" and line["event"] == "auth"]


def test_nothing_answers_without_a_credential(served):
    logged = len(_auth_lines(served))
    for path in READS:
        a = call(served.url + path)
        doc = problem(a, 401, "unauthorized")
        assert a.headers["www-authenticate"].startswith("Bearer")
        assert doc["instance"] == path
        problem(call(served.url + path, token="devid_op_" + "x" * 43), 401, "unauthorized")
        problem(call(served.url + path, headers={"Authorization": "Basic Zm9vOmJhcg=="}), 401, "unauthorized")
    for path in WRITES:
        problem(call(served.url + path, "POST", body={"reason": "keyCompromise"}), 401, "unauthorized")
    # a path that does not exist is not found only for someone who may ask
    problem(call(served.url + "/api/v1/nothing"), 401, "unauthorized")
    # the web view's cookie is no credential for the API (a browser sends it by itself)
    problem(call(served.url + "/api/v1/devices", headers={"Cookie": "devid_session=1.abc"}), 401, "unauthorized")
    # nothing was revoked by those
    assert call(served.url + "/api/v1/devices/TS00000002", token=served.token).json["state"] != "revoked"
    # dozens of refusals from one address: at most one `auth` line a minute for it (the first
    # refusal of this test may fall in the minute of an earlier one: then none)
    lines = _auth_lines(served)
    assert len(lines) >= 1 and len(lines) - logged <= 1, lines
    assert all(line["peer"] == "127.0.0.1" for line in lines)


def test_every_read_endpoint_with_the_token(served):
    t, url = served.token, served.url
    for path in READS:
        assert call(url + path, token=t).status == 200, path
    devices = call(url + "/api/v1/devices", token=t).json
    assert [d["serial"] for d in devices["devices"]] == [f"TS0000000{i}" for i in range(1, 8)]
    one = devices["devices"][0]
    assert one["state"] == "enrolled" and one["certificate_expires"]
    assert devices["devices"][1]["certificate_expires"] is None       # provisioned, not enrolled
    enrolled = call(url + "/api/v1/devices?state=enrolled", token=t).json["devices"]
    assert [d["serial"] for d in enrolled] == ["TS00000001", "TS00000003", "TS00000005"]
    assert call(url + "/api/v1/devices?type=meter", token=t).json["devices"] == []
    assert len(call(url + "/api/v1/devices?expiring_within=100d", token=t).json["devices"]) == 3   # 90-day certs
    assert call(url + "/api/v1/devices?expiring_within=1d", token=t).json["devices"] == []

    assert call(url + "/api/v1/devices/TS00000001", token=t).json["serial"] == "TS00000001"
    certs = call(url + "/api/v1/devices/TS00000001/certificates", token=t).json["certificates"]
    assert [(c["profile"], c["state"]) for c in certs] == [("factory", "current"), ("operational", "current")]
    op = certs[1]
    parsed = x509.load_pem_x509_certificate(op["pem"].encode())
    assert format(parsed.serial_number, "X").zfill(len(op["serial"])) == op["serial"]
    assert op["not_after"] == parsed.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ") == one["certificate_expires"]
    assert op["revocation_reason"] is None and op["not_before"] and not op["expired"]

    history = call(url + "/api/v1/devices/TS00000001/attestations", token=t).json["attestations"]
    assert history and history[0]["tier"] == "affirming" and history[0]["acceptable"] is True
    assert history[0]["claims"] and isinstance(history[0]["reasons"], list)

    log = call(url + "/api/v1/attestation-log", token=t).json
    assert log["verification"]["status"] == "verified" and log["verification"]["ok"] is True
    assert {e["device"] for e in log["entries"]} == {"TS00000001", "TS00000003", "TS00000005"}
    verification = call(url + "/api/v1/attestation-log/verification", token=t).json
    assert verification["ok"] and verification["problems"] == [] and verification["head_seq"] == len(log["entries"])

    due = call(url + "/api/v1/certificates/expiring?within=100d", token=t).json["certificates"]
    assert [c["device"] for c in due] == sorted([c["device"] for c in due], key=lambda s: [
        x["not_after"] for x in due if x["device"] == s][0])
    assert {c["device"] for c in due} == {"TS00000001", "TS00000003", "TS00000005"}
    assert call(url + "/api/v1/certificates/expiring?within=1d", token=t).json["certificates"] == []

    overview = call(url + "/api/v1/overview", token=t).json
    assert overview["devices"]["enrolled"] == 3 and overview["certificates_issued_last_hour"] == 3
    assert overview["verdict_tiers_last_day"] == {"affirming": 3}
    metrics = call(url + "/metrics", token=t)
    assert metrics.headers["content-type"].startswith("text/plain")


def test_problem_details(served):
    t, url = served.token, served.url
    problem(call(url + "/api/v1/devices/NOPE1", token=t), 404, "not-found")
    problem(call(url + "/api/v1/devices/NOPE1/certificates", token=t), 404, "not-found")
    problem(call(url + "/api/v1/nothing", token=t), 404, "not-found")
    assert problem(call(url + "/api/v1/devices?limit=0", token=t), 400, "bad-parameter")["parameter"] == "limit"
    problem(call(url + "/api/v1/devices?limit=501", token=t), 400, "bad-parameter")
    problem(call(url + "/api/v1/devices?state=lost", token=t), 400, "bad-parameter")
    problem(call(url + "/api/v1/devices?cursor=bm9wZQ", token=t), 400, "bad-parameter")
    problem(call(url + "/api/v1/devices?expiring_within=soon", token=t), 400, "bad-parameter")
    # a duration past what a date can hold, a cursor nested past the recursion limit: 400, not 500
    assert "3650 days" in problem(call(url + "/api/v1/devices?expiring_within=999999w", token=t), 400,
                                  "bad-parameter")["detail"]
    problem(call(url + "/api/v1/certificates/expiring?within=999999w", token=t), 400, "bad-parameter")
    nested = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
    problem(call(url + f"/api/v1/devices?cursor={nested}", token=t), 400, "bad-parameter")
    problem(call(url + f"/api/v1/attestation-log?cursor={nested[:256]}", token=t), 400, "bad-parameter")
    problem(call(url + "/api/v1/devices", "DELETE", token=t), 405, "method-not-allowed")
    rev = url + "/api/v1/devices/TS00000007/revoke"
    problem(call(rev, "POST", token=t, body=b"reason=x", content_type="text/plain"), 415, "unsupported-media-type")
    problem(call(rev, "POST", token=t), 415, "unsupported-media-type")     # no body needs the type too
    problem(call(rev, "POST", token=t, body=b"{not json"), 400, "bad-request")
    problem(call(rev, "POST", token=t, body={"reason": "because"}), 400, "bad-request")
    problem(call(rev, "POST", token=t, body={"reason": "keyCompromise", "extra": 1}), 400, "bad-request")
    problem(call(url + "/api/v1/certificates/ABCDEF0123456789/revoke", "POST", token=t, body={}), 404, "not-found")
    factory_ca = call(url + "/api/v1/devices/TS00000007/certificates", token=t).json["certificates"][0]
    assert factory_ca["state"] == "current"       # nothing above changed TS00000007


def test_paging_walks_every_row_once(served):
    t, url = served.token, served.url
    seen, cursor, pages = [], None, 0
    while True:
        a = call(url + "/api/v1/devices?limit=2" + (f"&cursor={cursor}" if cursor else ""), token=t).json
        seen += [d["serial"] for d in a["devices"]]
        pages += 1
        cursor = a["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"TS0000000{i}" for i in range(1, 8)] and pages == 4
    entries, cursor = [], None
    while True:
        a = call(url + "/api/v1/attestation-log?limit=1" + (f"&cursor={cursor}" if cursor else ""), token=t).json
        entries += [e["seq"] for e in a["entries"]]
        cursor = a["next_cursor"]
        if cursor is None:
            break
    assert entries == sorted(entries, reverse=True) and len(entries) == len(set(entries)) >= 3
    due, cursor = [], None
    while True:
        a = call(url + "/api/v1/certificates/expiring?within=100d&limit=1" + (f"&cursor={cursor}" if cursor else ""),
                 token=t).json
        due += [c["serial"] for c in a["certificates"]]
        cursor = a["next_cursor"]
        if cursor is None:
            break
    assert len(due) == len(set(due)) == 3


def test_revocation_through_the_api_refuses_the_device_and_is_logged_with_who(served):
    t, url = served.token, served.url
    certs = call(url + "/api/v1/devices/TS00000005/certificates", token=t).json["certificates"]
    op = [c for c in certs if c["profile"] == "operational"][0]
    one = call(url + f"/api/v1/certificates/{op['serial']}/revoke", "POST", token=t, body={"reason": "superseded"})
    assert one.status == 200 and one.json["certificate"]["state"] == "revoked" and not one.json["already_revoked"]
    a = call(url + "/api/v1/devices/TS00000003/revoke", "POST", token=t, body={"reason": "keyCompromise"})
    assert a.status == 200, a.body
    doc = a.json
    assert doc["device"]["state"] == "revoked" and doc["device"]["revocation_reason"] == "keyCompromise"
    assert {c["profile"] for c in doc["newly_revoked"]} == {"factory", "operational"}
    again = call(url + "/api/v1/devices/TS00000003/revoke", "POST", token=t, body={"reason": "keyCompromise"}).json
    assert again["already_revoked"] is True and again["newly_revoked"] == []
    # the gateway refuses both at the next renewal over DTLS (their operational identity is revoked)
    for serial in ("TS00000003", "TS00000005"):
        with pytest.raises(EnrollFailed, match="revoked"):
            asyncio.run(renew(served.factory / serial, served.coap, timeout=10))
    lines = [json.loads(line) for line in served.log.read_text().splitlines() if line.startswith("{")]
    revokes = [line for line in lines if line["logger"] == "devid.operator" and line["event"] == "revoke"]
    assert {(r.get("device"), r["reason"], r["via"]) for r in revokes} >= {
        ("TS00000005", "superseded", "api"), ("TS00000003", "keyCompromise", "api")}
    assert all(r["who"].startswith("token:") and served.token not in json.dumps(r) for r in revokes)


def test_rotating_the_token_takes_effect_at_once(served):
    old = served.token
    rotated = run_devid("operator", "token", "--rotate", data_dir=served.data.path, check=True).stdout.decode().strip()
    assert rotated != old and rotated.startswith("devid_op_")
    assert stat.S_IMODE((served.data.path / "operator.token").stat().st_mode) == 0o600
    problem(call(served.url + "/api/v1/devices", token=old), 401, "unauthorized")
    assert call(served.url + "/api/v1/devices", token=rotated).status == 200
    served.token = rotated
