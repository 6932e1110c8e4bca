"""The load generator's CoAP codec (RFC 7252, Block2 of RFC 7959): just what its requests carry and
its answers need, without aiocoap's per-message cost. What goes into a request (paths, formats,
Accept) is the device client's (`devid.gateway.device.protocol.Endpoint.options`); this module only
puts it into bytes and reads answers back. A decoded `Response` is a `Reply` the shared flows read.
"""

from __future__ import annotations

from typing import Iterable

from devid.gateway.device.protocol import CHANGED, CONTENT, GET, OPT_CONTENT_FORMAT, POST, encode_uint  # noqa: F401

CON, NON, ACK, RST = 0, 1, 2, 3
OPT_BLOCK2 = 23


def _ext(n: int) -> tuple[int, bytes]:
    if n < 13:
        return n, b""
    if n < 269:
        return 13, bytes([n - 13])
    return 14, (n - 269).to_bytes(2, "big")


def encode_options(options: Iterable[tuple[int, bytes]]) -> bytes:
    """Options as (number, value) pairs, in ascending order of number."""
    out = bytearray()
    last = 0
    for number, value in options:
        d, dx = _ext(number - last)
        n, nx = _ext(len(value))
        out.append(d << 4 | n)
        out += dx
        out += nx
        out += value
        last = number
    return bytes(out)


def block2_option(num: int, szx: int) -> tuple[int, bytes]:
    return OPT_BLOCK2, encode_uint(num << 4 | szx)


def encode_message(mtype: int, code: int, mid: int, token: bytes, options: bytes, payload: bytes = b"") -> bytes:
    head = bytes((0x40 | mtype << 4 | len(token), code, mid >> 8, mid & 0xFF)) + token + options
    return head + b"\xff" + payload if payload else head


class Response:
    __slots__ = ("mtype", "code", "mid", "token", "content_format", "block2", "payload")

    def __init__(self, mtype, code, mid, token, content_format, block2, payload) -> None:
        self.mtype, self.code, self.mid, self.token = mtype, code, mid, token
        self.content_format, self.block2, self.payload = content_format, block2, payload

    @property
    def code_text(self) -> str:
        """`2.05`: the code alone (protocol.code_text adds its name)."""
        return f"{self.code >> 5}.{self.code & 31:02d}"


def decode_message(data: bytes) -> Response:
    """Raises ValueError for a malformed message."""
    if len(data) < 4 or data[0] >> 6 != 1:
        raise ValueError("not a CoAP version 1 message")
    tkl = data[0] & 15
    if tkl > 8 or len(data) < 4 + tkl:
        raise ValueError("bad token length")
    pos, n, number = 4 + tkl, len(data), 0
    content_format = block2 = None
    payload = b""
    while pos < n:
        byte = data[pos]
        pos += 1
        if byte == 0xFF:
            payload = data[pos:]
            if not payload:
                raise ValueError("payload marker without payload")
            break
        delta, length = byte >> 4, byte & 15
        if delta == 15 or length == 15:
            raise ValueError("reserved option nibble")
        if delta == 13:
            delta, pos = data[pos] + 13, pos + 1
        elif delta == 14:
            delta, pos = int.from_bytes(data[pos:pos + 2], "big") + 269, pos + 2
        if length == 13:
            length, pos = data[pos] + 13, pos + 1
        elif length == 14:
            length, pos = int.from_bytes(data[pos:pos + 2], "big") + 269, pos + 2
        number += delta
        value = data[pos:pos + length]
        if len(value) != length:
            raise ValueError("truncated option")
        pos += length
        if number == OPT_CONTENT_FORMAT:
            content_format = int.from_bytes(value, "big")
        elif number == OPT_BLOCK2:
            block2 = int.from_bytes(value, "big")
    return Response(data[0] >> 4 & 3, data[1], int.from_bytes(data[2:4], "big"), data[4:4 + tkl],
                    content_format, block2, payload)
