"""The answer of GET /psk as a PSK device reads it (gateway/device/psk.py read_operational_psk,
docs/enrollment.md#the-answer): only an answer the gateway signed, for this device, for the
certificate it was just issued, whose sealed key opens with that certificate's key. Review 18c M1:
a PSK holder on the path at enrollment answers GET /psk itself with a key of its choosing, sealed
to the device's (public) certificate key; the device must refuse it."""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca import sealed
from devid.ca.hierarchy import build_gateway_cert
from devid.gateway.device.psk import Psk, PskUnavailable, gateway_check, read_operational_psk

from .conftest import NOW, make_csr, register_device

KEY = b"Qm9k3f-EXAMPLE_k"
CONFIG = cbor2.dumps({"renewal": {"window_days": 30}})


@pytest.fixture
def world(data, ca):
    device_key = ec.generate_private_key(ec.SECP256R1())
    register_device(ca, "SN1")
    cert = ca.issue_operational(make_csr(device_key)[0], "SN1", NOW).cert
    gw = data.issuer("gateway")
    return {"data": data, "device_key": device_key, "cert": cert, "gateway": (gw.key, [gw.cert, data.cert("operational")]),
            "root": data.cert("root"), "op": data.issuer("operational")}


def answer(world, *, identity="op:SN1", cert=None, key=KEY, sealed_to=None, signer=None, config=CONFIG) -> bytes:
    cert = cert or world["cert"]
    payload = cbor2.dumps({"identity": identity,
                           "certificate": hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest(),
                           "sealed_key": cbor2.loads(sealed.seal((sealed_to or world["cert"].public_key()), key)),
                           "config": None if config is None else hashlib.sha256(config).digest()})
    return sealed.sign(payload, *(signer or world["gateway"]))


def read(world, blob: bytes, host: str = "127.0.0.1", when=NOW):
    return read_operational_psk(blob, world["device_key"], serial="SN1", certificate=world["cert"],
                                check_chain=gateway_check(world["root"], host, world["cert"].issuer, when))


def test_the_gateways_answer_is_read(world):
    psk, digest = read(world, answer(world))
    assert psk == Psk(b"op:SN1", KEY) and digest == hashlib.sha256(CONFIG).digest()
    assert KEY.decode() not in repr(psk)            # a Psk never shows its key
    # a gateway whose configuration template is broken still sends the key, with no digest:
    # the device then asks GET /config with its operational PSK
    assert read(world, answer(world, config=None)) == (psk, None)


def test_an_answer_a_psk_holder_made_up_is_refused(world):
    """Sealed to the device's public key, as a PSK holder on the path can: signed with a key of
    its own (a self-made chain), or by a certificate of the right CA that is not the gateway's for
    this host (the MQTT broker's, a device's), or with the gateway's chain but not its signature."""
    stranger = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "devid gateway")])
    self_made = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(stranger.public_key())
                 .serial_number(1).not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=1))
                 .sign(stranger, hashes.SHA256()))
    # the MQTT broker's and the operator listener's certificates: the operational CA's, serverAuth,
    # and (as a deployment may well have them) valid for the gateway's own host
    broker_key = ec.generate_private_key(ec.SECP256R1())
    broker = build_gateway_cert(broker_key, world["op"], ["broker.example"], world["data"].config.identity, NOW,
                                os.urandom, common_name="devid MQTT broker", localhost=True)
    listener_key = ec.generate_private_key(ec.SECP256R1())
    listener = build_gateway_cert(listener_key, world["op"], [], world["data"].config.identity, NOW, os.urandom,
                                  common_name="devid operator listener")
    # a gateway certificate, by name, from the manufacturing CA
    mfg = world["data"].issuer("manufacturing")
    elsewhere_key = ec.generate_private_key(ec.SECP256R1())
    elsewhere = build_gateway_cert(elsewhere_key, mfg, [], world["data"].config.identity, NOW, os.urandom)
    for signer, said in (((stranger, [self_made]), "not the gateway"),
                         ((broker_key, [broker, world["op"].cert]), "commonName"),
                         ((listener_key, [listener, world["op"].cert]), "commonName"),
                         ((elsewhere_key, [elsewhere, mfg.cert]), "not issued by the CA"),
                         ((world["device_key"], [world["cert"], world["op"].cert]), "not the gateway"),
                         ((stranger, world["gateway"][1]), "signature does not verify")):
        with pytest.raises(PskUnavailable, match=said):
            read(world, answer(world, key=b"ATTACKERchosen-_", signer=signer))


def test_an_answer_for_another_device_or_certificate_or_key_is_refused(world, ca):
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = ca.issue_operational(make_csr(other_key)[0], "SN1", NOW).cert
    with pytest.raises(PskUnavailable, match="not this device"):
        read(world, answer(world, identity="op:SN99"))
    with pytest.raises(PskUnavailable, match="another certificate"):
        read(world, answer(world, cert=other))
    with pytest.raises(PskUnavailable, match="not sealed to this key"):
        read(world, answer(world, sealed_to=other_key.public_key()))


def test_the_gateway_must_be_valid_for_the_host_reached_and_now(world):
    with pytest.raises(PskUnavailable, match="not the gateway"):
        read(world, answer(world), host="gw.elsewhere.example")
    gateway_cert = world["gateway"][1][0]
    with pytest.raises(PskUnavailable, match="not the gateway"):
        read(world, answer(world), when=gateway_cert.not_valid_after_utc + timedelta(days=1))


@pytest.mark.parametrize("blob", [b"", cbor2.dumps({"identity": "op:SN1"}), cbor2.dumps(cbor2.CBORTag(18, [1, 2, 3])),
                                  cbor2.dumps(cbor2.CBORTag(18, [sealed.SIGN_PROTECTED, {}, b"x", b"y" * 64]))])
def test_malformed_answers_are_refused(world, blob):
    with pytest.raises(PskUnavailable):
        read(world, blob)
