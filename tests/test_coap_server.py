"""The gateway's CoAP server core (gateway/coap/server.py) on the wire: message types and IDs,
deduplication, options it must refuse, routing errors. Real gateway, real DTLS on loopback."""

from __future__ import annotations

import aiocoap
import cbor2
from aiocoap.numbers import codes
from aiocoap.optiontypes import OpaqueOption, StringOption

from .dtls_helpers import RawCoapOverDTLS
from .gateway_helpers import run_with_gateway, token_for


def wire(mtype, mid: int, token: bytes = b"", extra=(), **kw) -> bytes:
    m = aiocoap.Message(**kw)
    m.mtype, m.mid, m.token = mtype, mid, token
    for option in extra:
        m.opt.add_option(option)
    return m.encode()


def run(world, body):
    data, out = world

    async def main(uri, gw):
        async with RawCoapOverDTLS(out / "TS00000001", int(uri.rsplit(":", 1)[1])) as dev:
            await body(dev, gw)
    run_with_gateway(data, main)


def test_ping_gets_reset_and_requests_get_piggybacked_acks(world):
    async def body(dev, gw):
        r = await dev.exchange(wire(aiocoap.CON, 0x2001, code=codes.EMPTY))
        assert r.mtype == aiocoap.RST and r.mid == 0x2001 and r.code == codes.EMPTY
        r = await dev.exchange(wire(aiocoap.CON, 0x2002, b"\xab\xcd", code=codes.GET, uri_path=["whoami"]))
        assert (r.mtype, r.mid, r.token, r.code) == (aiocoap.ACK, 0x2002, b"\xab\xcd", codes.CONTENT)
        assert b'"serial": "TS00000001"' in r.payload
        # a NON request gets a NON response with the token echoed
        r = await dev.exchange(wire(aiocoap.NON, 0x2003, b"\x07", code=codes.GET, uri_path=["whoami"]))
        assert (r.mtype, r.token, r.code) == (aiocoap.NON, b"\x07", codes.CONTENT)
    run(world, body)


def test_retransmitted_request_is_answered_once(world):
    async def body(dev, gw):
        request = wire(aiocoap.CON, 0x3001, b"\x01", code=codes.GET, uri_path=["attest", "nonce"])
        first = await dev.exchange(request)
        again = await dev.exchange(request)
        assert first.code == again.code == codes.CONTENT and first.payload == again.payload
        # a new message ID is a new request: a new nonce
        other = await dev.exchange(wire(aiocoap.CON, 0x3002, b"\x02", code=codes.GET, uri_path=["attest", "nonce"]))
        assert cbor2.loads(other.payload)["nonce"] != cbor2.loads(first.payload)["nonce"]
    run(world, body)


def test_refusals_by_the_message_layer(world):
    async def body(dev, gw):
        r = await dev.exchange(wire(aiocoap.CON, 0x4001, b"\x01", code=codes.GET, uri_path=["nowhere"]))
        assert r.code == codes.NOT_FOUND and r.mid == 0x4001
        r = await dev.exchange(wire(aiocoap.CON, 0x4002, b"\x02", code=codes.DELETE, uri_path=["config"]))
        assert r.code == codes.METHOD_NOT_ALLOWED
        # an unknown critical option (odd number) must not be ignored: 4.02
        r = await dev.exchange(wire(aiocoap.CON, 0x4003, b"\x03", code=codes.GET, uri_path=["whoami"],
                                    extra=[OpaqueOption(65001, b"x")]))
        assert r.code == codes.BAD_OPTION
        # an unknown elective option is ignored
        r = await dev.exchange(wire(aiocoap.CON, 0x4004, b"\x04", code=codes.GET, uri_path=["whoami"],
                                    extra=[OpaqueOption(65000, b"x")]))
        assert r.code == codes.CONTENT
        r = await dev.exchange(wire(aiocoap.CON, 0x4005, b"\x05", code=codes.GET, uri_path=["whoami"],
                                    extra=[StringOption(35, "coap://elsewhere/x")]))
        assert r.code == codes.PROXYING_NOT_SUPPORTED
        # a response sent to the gateway (it never asked anything) is reset
        r = await dev.exchange(wire(aiocoap.CON, 0x4006, b"\x06", code=codes.CONTENT))
        assert r.mtype == aiocoap.RST and r.mid == 0x4006
        assert gw.coap.requests >= 5
    run(world, body)


def test_blockwise_response_in_order(world):
    """The client asks for 256-byte blocks of /crts (PKCS#7, about 1.2 KB): Block2 follow-ups,
    served from the response cut once, give the whole body."""
    from aiocoap.optiontypes import BlockOption

    async def body(dev, gw):
        r = await dev.exchange(wire(aiocoap.CON, 0x5001, b"\x01", code=codes.GET, uri_path=["config"], accept=50))
        assert r.code == codes.FORBIDDEN        # factory identity before enrollment
        # a later block of a response never asked for: 4.08
        r = await dev.exchange(wire(aiocoap.CON, 0x5000, b"\x09", code=codes.GET,
                                    uri_path=[".well-known", "est", "crts"],
                                    block2=BlockOption.BlockwiseTuple(2, False, 4)))
        assert r.code == codes.REQUEST_ENTITY_INCOMPLETE
        r = await dev.exchange(wire(aiocoap.CON, 0x5002, b"\x02", code=codes.GET,
                                    uri_path=[".well-known", "est", "crts"], block2=(0, False, 4)))
        assert r.code == codes.CONTENT and r.opt.block2 is not None and r.opt.block2.more
        assert len(r.payload) == 256
        parts, num, mid = [r.payload], 1, 0x5003
        while r.opt.block2.more:
            r = await dev.exchange(wire(aiocoap.CON, mid, bytes([mid & 0xFF]), code=codes.GET,
                                        uri_path=[".well-known", "est", "crts"],
                                        block2=BlockOption.BlockwiseTuple(num, False, 4)))
            assert r.code == codes.CONTENT and r.opt.block2.block_number == num
            parts.append(r.payload)
            num, mid = num + 1, mid + 1
        from cryptography.hazmat.primitives.serialization import pkcs7
        certs = pkcs7.load_der_pkcs7_certificates(b"".join(parts))
        assert len(certs) == 2
        # a block past the end: 4.02
        r = await dev.exchange(wire(aiocoap.CON, mid, b"\x0a", code=codes.GET, uri_path=[".well-known", "est", "crts"],
                                    block2=BlockOption.BlockwiseTuple(num + 3, False, 4)))
        assert r.code == codes.BAD_OPTION
    run(world, body)


def test_block1_upload_is_reassembled_capped_and_echoed(world):
    """A Block1 upload: 2.31 Continue per part, the final answer echoes the last Block1 (RFC 7959
    2.3); a resource that takes no POST answers 4.05 at once and keeps nothing; at most two
    uploads per session are kept."""
    from aiocoap.optiontypes import BlockOption
    data, out = world

    async def body(dev, gw):
        r = await dev.exchange(wire(aiocoap.CON, 0x6001, b"\x01", code=codes.GET, uri_path=["attest", "nonce"]))
        token = token_for(out / "TS00000001", cbor2.loads(r.payload)["nonce"])
        assert 128 < len(token) <= 256
        parts = [token[:128], token[128:]]
        r = await dev.exchange(wire(aiocoap.CON, 0x6002, b"\x02", code=codes.POST, uri_path=["attest", "evidence"],
                                    content_format=60, payload=parts[0], block1=BlockOption.BlockwiseTuple(0, True, 3)))
        assert r.code == codes.CONTINUE and r.opt.block1 == (0, True, 3)
        r = await dev.exchange(wire(aiocoap.CON, 0x6003, b"\x03", code=codes.POST, uri_path=["attest", "evidence"],
                                    content_format=60, payload=parts[1], block1=BlockOption.BlockwiseTuple(1, False, 3)))
        assert r.code == codes.CHANGED and r.opt.block1 == (1, False, 3)
        assert cbor2.loads(r.payload)["verdict"] == "affirming"
        # a part without its beginning: 4.08
        r = await dev.exchange(wire(aiocoap.CON, 0x6004, b"\x04", code=codes.POST, uri_path=["attest", "evidence"],
                                    content_format=60, payload=b"x" * 16, block1=BlockOption.BlockwiseTuple(5, False, 4)))
        assert r.code == codes.REQUEST_ENTITY_INCOMPLETE
        # /whoami takes no POST: 4.05 for the first block, nothing kept
        r = await dev.exchange(wire(aiocoap.CON, 0x6005, b"\x05", code=codes.POST, uri_path=["whoami"],
                                    payload=b"x" * 1024, block1=BlockOption.BlockwiseTuple(0, True, 6)))
        assert r.code == codes.METHOD_NOT_ALLOWED
        # many uploads begun in one session: at most two are kept
        for i in range(6):
            r = await dev.exchange(wire(aiocoap.CON, 0x6010 + i, bytes([i]), code=codes.POST,
                                        uri_path=["attest", "evidence"], uri_query=[f"n={i}"], content_format=60,
                                        payload=b"x" * 256, block1=BlockOption.BlockwiseTuple(0, True, 4)))
            assert r.code == codes.CONTINUE
        (uploads,) = gw.coap._uploads.values()
        assert len(uploads) == 2
    run(world, body)


def test_malformed_and_odd_messages_are_rejected_not_crashing(world, caplog):
    async def body(dev, gw):
        # a CON whose Uri-Path is not UTF-8: a Reset, no traceback, and the session goes on
        r = await dev.exchange(bytes.fromhex("41011234" "07" "b2fffe"))
        assert r.mtype == aiocoap.RST and r.mid == 0x1234
        r = await dev.exchange(wire(aiocoap.CON, 0x7001, b"\x01", code=codes.GET, uri_path=["whoami"]))
        assert r.code == codes.CONTENT
        # a NON with an unknown critical option: a Reset (RFC 7252 5.4.1)
        r = await dev.exchange(wire(aiocoap.NON, 0x7002, b"\x02", code=codes.GET, uri_path=["whoami"],
                                    extra=[OpaqueOption(65001, b"x")]))
        assert r.mtype == aiocoap.RST and r.mid == 0x7002
        # block size 7 (BERT) is for CoAP over TCP: 4.00
        from aiocoap.optiontypes import BlockOption
        r = await dev.exchange(wire(aiocoap.CON, 0x7003, b"\x03", code=codes.GET, uri_path=[".well-known", "est", "crts"],
                                    block2=BlockOption.BlockwiseTuple(0, False, 7)))
        assert r.code == codes.BAD_REQUEST
    run(world, body)
    assert not [rec for rec in caplog.records if rec.exc_info], [rec.getMessage() for rec in caplog.records]
