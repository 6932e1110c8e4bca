"""How the one-request flow (gateway/device/flow_one.py) reads the answer to its POST /sen, for
answers the real gateway never sends: each shape of multipart-core answer (RFC 8710) other than
the contract's [287, certificate, 60, configuration(, 60, verdict)] fails with EnrollFailed naming
the step and what is wrong, and no certificate is handed over unless it was checked; the parts
are read in the classic flow's order (verdict, certificate, configuration), so a configuration
that cannot be read comes after the certificate was handed over (the caller has stored it:
ConfigNotFetched). The flow is driven by hand (sans-I/O), with a real certificate the CA issued
for the flow's new key."""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from devid.gateway.device.flow import Done, Enrolled
from devid.gateway.device.flow_one import one_request_flow
from devid.gateway.device.identity import DeviceIdentity, device_csr, root_verifier
from devid.gateway.device.protocol import CRTS, CT_MULTIPART, CT_PKCS7_CERTS, SEN, Answer, EnrollFailed, Request

from .conftest import NOW, register_device
from .gateway_helpers import FW

CHANGED, CONTENT, FORBIDDEN = 0x44, 0x45, 0x83


@pytest.fixture
def device(data, ca):
    """(identity, the flow's new key, the DER certificate the CA issued for it, config, verdict, verify)."""
    factory_key, factory = register_device(ca, "SN1", "temperature-sensor")
    identity = DeviceIdentity.of(factory.cert, factory_key)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.issue_operational(device_csr(key, "SN1"), "SN1", NOW).cert.public_bytes(Encoding.DER)
    anchors = [data.cert(name).public_bytes(Encoding.DER) for name in ("root", "operational")]
    config = cbor2.dumps({"device": "SN1", "device_type": "temperature-sensor", "trust_anchors": anchors})
    verdict = cbor2.dumps({"verdict": "affirming", "acceptable": True, "reasons": [], "log_seq": 7})
    return identity, key, leaf, config, verdict, root_verifier(data.cert("root"))


def feed(device, reply, firmware=FW, crts: list | None = None):
    """Run the flow to its POST /sen, answer it with `reply`: (the Done steps, the result or the
    EnrollFailed). A GET /.well-known/est/crts after it (the flow looks for the certificate's CA)
    is answered with `crts` (a PKCS#7 bag of them), and noted there."""
    identity, key, *_, verify = device
    flow = one_request_flow(identity, firmware, verify, session_nonce=bytes(range(32)), new_key=lambda: key)
    request = flow.send(None)
    assert request.endpoint is SEN[CT_MULTIPART]
    dones: list[Done] = []
    try:
        item = flow.send(reply)
        while True:
            if isinstance(item, Request):
                assert item.endpoint is CRTS and crts is not None, f"unexpected request {item}"
                crts.append(item)
                item = flow.send(Answer(CONTENT, CT_PKCS7_CERTS, crts[0]))
                continue
            dones.append(item)
            item = flow.send(None)
    except StopIteration as stop:
        return dones, stop.value
    except EnrollFailed as exc:
        return dones, exc


def multipart(*items, tail: bytes = b"") -> Answer:
    return Answer(CHANGED, CT_MULTIPART, cbor2.dumps(list(items)) + tail)


def test_the_contracts_answer_is_read_part_by_part(device):
    _, key, leaf, config, verdict, _ = device
    dones, enrolled = feed(device, multipart(287, leaf, 60, config, 60, verdict))
    assert isinstance(enrolled, Enrolled)
    assert [d.step for d in dones] == ["evidence", "enroll", "config"]
    assert (enrolled.verdict.tier, enrolled.verdict.acceptable, enrolled.verdict.log_seq) == ("affirming", True, 7)
    assert enrolled.issued.key is key and enrolled.issued.certificate.public_bytes(Encoding.DER) == leaf
    assert len(enrolled.issued.chain) == 2              # the operational CA, from the configuration
    assert enrolled.config.raw == config
    # without firmware: no evidence in the CSR, and the answer has no verdict pair
    dones, enrolled = feed(device, multipart(287, leaf, 60, config), firmware=None)
    assert [d.step for d in dones] == ["enroll", "config"] and enrolled.verdict is None


BAD_SHAPES = {
    "not CBOR": (lambda leaf, config, verdict: Answer(CHANGED, CT_MULTIPART, b"\xff\x00"),
                 "the multipart-core answer cannot be read as CBOR"),
    "trailing bytes": (lambda leaf, config, verdict: multipart(287, leaf, 60, config, 60, verdict, tail=b"\x00"),
                       "the multipart-core answer cannot be read as CBOR (1 byte(s) after the end of the item"),
    "empty": (lambda leaf, config, verdict: Answer(CHANGED, CT_MULTIPART, b""),
              "the multipart-core answer cannot be read as CBOR (empty input)"),
    "a map": (lambda leaf, config, verdict: Answer(CHANGED, CT_MULTIPART, cbor2.dumps({287: leaf})),
              "the answer is not a multipart-core array (RFC 8710)"),
    "odd items": (lambda leaf, config, verdict: multipart(287, leaf, 60),
                  "the multipart-core array has 3 items, not (content format, representation) pairs"),
    "negative format": (lambda leaf, config, verdict: multipart(-1, leaf, 60, config, 60, verdict),
                        "part 1 of the answer: its content format -1 is not an unsigned integer below 65536"),
    "format too large": (lambda leaf, config, verdict: multipart(287, leaf, 65536, config, 60, verdict),
                         "part 2 of the answer: its content format 65536 is not"),
    "boolean format": (lambda leaf, config, verdict: multipart(True, leaf, 60, config, 60, verdict),
                       "part 1 of the answer: its content format True is not"),
    "text format": (lambda leaf, config, verdict: multipart("287", leaf, 60, config, 60, verdict),
                    "part 1 of the answer: its content format '287' is not"),
    "text part": (lambda leaf, config, verdict: multipart(287, leaf, 60, config.hex(), 60, verdict),
                  "part 2 of the answer (content format 60) is not a byte string"),
    "null part": (lambda leaf, config, verdict: multipart(287, None, 60, config, 60, verdict),
                  "part 1 of the answer (content format 287) is not a byte string"),
    "nested part": (lambda leaf, config, verdict: multipart(287, [leaf], 60, config, 60, verdict),
                    "part 1 of the answer (content format 287) is not a byte string"),
    "no verdict": (lambda leaf, config, verdict: multipart(287, leaf, 60, config),
                   "the answer holds 2 parts (287, 60), expected 3: certificate (287), configuration (60), "
                   "verdict (60)"),
    "a part more": (lambda leaf, config, verdict: multipart(287, leaf, 60, config, 60, verdict, 60, verdict),
                    "the answer holds 4 parts (287, 60, 60, 60), expected 3"),
    "nothing": (lambda leaf, config, verdict: multipart(), "the answer holds 0 parts (none), expected 3"),
    "PKCS#7 first": (lambda leaf, config, verdict: multipart(281, leaf, 60, config, 60, verdict),
                     "the answer's first part has content format 281, expected 287 (the certificate)"),
    "2.05": (lambda leaf, config, verdict: Answer(CONTENT, CT_MULTIPART, cbor2.dumps([287, leaf, 60, config])),
             "unexpected answer 2.05 Content, expected 2.04 Changed"),
    "RFC 9148's answer": (lambda leaf, config, verdict: Answer(CHANGED, 287, leaf), "content format 287, expected 62"),
    "attestation required": (lambda leaf, config, verdict: Answer(
        FORBIDDEN, 257, cbor2.dumps({-1: "attestation required", -2: "put evidence in the CSR"})),
        "4.03 Forbidden attestation required: put evidence in the CSR"),
}


@pytest.mark.parametrize("shape", sorted(BAD_SHAPES))
def test_any_other_shape_fails_at_enroll_before_the_certificate_is_handed_over(device, shape):
    _, _, leaf, config, verdict, _ = device
    make, reason = BAD_SHAPES[shape]
    dones, failed = feed(device, make(leaf, config, verdict))
    assert dones == [] and isinstance(failed, EnrollFailed)
    assert failed.step == "enroll" and failed.reason.startswith(reason), failed.reason


def test_a_verdict_pair_without_evidence_is_refused(device):
    _, _, leaf, config, verdict, _ = device
    dones, failed = feed(device, multipart(287, leaf, 60, config, 60, verdict), firmware=None)
    assert dones == [] and failed.step == "enroll"
    assert failed.reason == ("the answer holds 3 parts (287, 60, 60), expected 2: certificate (287), "
                             "configuration (60)")


def test_the_verdict_is_reported_first_and_an_unacceptable_one_stops_the_flow(device):
    _, _, leaf, config, _, _ = device
    refused = cbor2.dumps({"verdict": "contraindicated", "acceptable": False,
                           "reasons": [{"code": "firmware-unknown", "tier": "contraindicated", "message": "x"}],
                           "log_seq": 3})
    dones, failed = feed(device, multipart(287, leaf, 60, config, 60, refused))
    assert [d.step for d in dones] == ["evidence"] and not dones[0].value.acceptable
    assert (failed.step, failed.reason) == ("evidence", "verdict contraindicated: firmware-unknown (with a "
                                                        "certificate, which is not used)")
    dones, failed = feed(device, multipart(287, leaf, 60, config, 50, b"{}"))
    assert dones == [] and (failed.step, failed.reason) == (
        "evidence", "the answer's verdict part has content format 50, expected 60")
    dones, failed = feed(device, multipart(287, leaf, 60, config, 60, b"\x01"))
    assert dones == [] and (failed.step, failed.reason) == ("evidence", "the answer is not a CBOR map")
    # the gateway's refusal of the evidence in the CSR reads as the classic flow's verdict
    problem = {-1: "attestation refused", -2: "verdict contraindicated: firmware-unknown"}
    dones, failed = feed(device, Answer(FORBIDDEN, 257, cbor2.dumps(problem)))
    assert dones == [] and (failed.step, failed.reason) == ("evidence", "verdict contraindicated: firmware-unknown")


def test_a_certificate_that_does_not_check_is_never_handed_over(device, data, ca):
    _, _, leaf, config, verdict, _ = device
    other = ca.issue_operational(device_csr(ec.generate_private_key(ec.SECP256R1()), "SN1"), "SN1", NOW)
    for part, reason in ((b"junk", "the gateway's answer is not a certificate"),
                         (other.cert.public_bytes(Encoding.DER), "no certificate for the new key in the answer")):
        dones, failed = feed(device, multipart(287, part, 60, config, 60, verdict))
        assert [d.step for d in dones] == ["evidence"]
        assert (failed.step, failed.reason) == ("certificate", reason)


def test_a_configuration_that_cannot_be_read_comes_after_the_certificate(device, data):
    """The certificate is handed over (Done `enroll`: `devid enroll` stores it) before the
    configuration part is read: its failure then is the device's ConfigNotFetched."""
    _, _, leaf, config, verdict, _ = device
    someone_else = cbor2.dumps(dict(cbor2.loads(config), device="SN2"))
    bag = pkcs7.serialize_certificates([data.cert("root"), data.cert("operational")], Encoding.DER)
    for part_format, part, reason, ca_from in (
            (50, config, "the answer's configuration part has content format 50, expected 60", "config"),
            (60, b"\x82\x01\x02", "the answer is not a CBOR map", "crts"),
            (60, someone_else, "configuration for 'SN2' ('temperature-sensor'), not this device", "config")):
        crts = [bag]
        dones, failed = feed(device, multipart(287, leaf, part_format, part, 60, verdict), crts=crts)
        # the certificate's CA: among the configuration's trust anchors, or from EST /crts when
        # the configuration cannot be read
        assert len(crts) == (2 if ca_from == "crts" else 1)
        assert [d.step for d in dones] == ["evidence", *(["crts"] if ca_from == "crts" else []), "enroll"]
        assert (failed.step, failed.reason) == ("config", reason)
        assert dones[-1].value.chain[1].subject == data.cert("operational").subject


def test_the_chain_holds_the_certificates_issuer_only(device, data):
    """op-chain.pem is the certificate and its CA: of the configuration's trust anchors (root,
    manufacturing, operational here) only the one that issued it follows it."""
    identity, key, leaf, config, verdict, verify = device
    anchors = [data.cert(name).public_bytes(Encoding.DER) for name in ("root", "manufacturing", "operational")]
    config = cbor2.dumps(dict(cbor2.loads(config), trust_anchors=anchors))
    dones, enrolled = feed(device, multipart(287, leaf, 60, config, 60, verdict))
    assert [c.subject for c in enrolled.issued.chain[1:]] == [data.cert("operational").subject]
    assert len(enrolled.config.data["trust_anchors"]) == 3
