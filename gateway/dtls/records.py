"""DTLS record framing: just enough to split a flight and pack records into datagrams.

OpenSSL hands a whole flight to the memory BIO at once (several records, possibly more than the
path MTU). Records may share a datagram but must not be split across two (RFC 6347 4.1.1), so
flights are cut at record boundaries and packed greedily into datagrams of at most `mtu` bytes.
"""

from __future__ import annotations

from typing import NamedTuple

HEADER = 13
CT_CHANGE_CIPHER_SPEC = 20
CT_ALERT = 21
CT_HANDSHAKE = 22
CT_APPLICATION_DATA = 23
HS_CLIENT_HELLO = 1


def split_records(data: bytes) -> list[bytes]:
    """Cut a byte string into whole DTLS records; a truncated tail is dropped."""
    records = []
    pos = 0
    n = len(data)
    while pos + HEADER <= n:
        length = int.from_bytes(data[pos + 11:pos + 13], "big")
        end = pos + HEADER + length
        if end > n:
            break
        records.append(data[pos:end])
        pos = end
    return records


def pack_datagrams(data: bytes, mtu: int) -> list[bytes]:
    """Pack the records of `data` into as few datagrams of at most `mtu` bytes as possible.
    A single record larger than the MTU goes alone (OpenSSL keeps handshake records within the
    MTU it was given; application records are capped by the caller)."""
    datagrams: list[bytes] = []
    current = b""
    for record in split_records(data):
        if current and len(current) + len(record) > mtu:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams


def is_client_hello(datagram: bytes) -> bool:
    """An epoch-0 handshake record whose first message is a ClientHello."""
    return (len(datagram) >= HEADER + 1 and datagram[0] == CT_HANDSHAKE
            and datagram[3:5] == b"\x00\x00" and datagram[HEADER] == HS_CLIENT_HELLO)


def content_types(datagram: bytes) -> list[int]:
    return [r[0] for r in split_records(datagram)]


HS_HELLO_VERIFY_REQUEST = 3
DTLS10 = b"\xfe\xff"


class ClientHello(NamedTuple):
    """What the gateway reads of an epoch-0 ClientHello before it keeps any state."""
    record_seq: bytes       # the record sequence number (a HelloVerifyRequest repeats it)
    message_seq: bytes
    random: bytes           # 32 bytes
    cookie: bytes
    params: bytes           # what the cookie is bound to, as on the wire: client_version, random,
                            # session_id, cipher_suites, compression_methods (each with its length)


def parse_client_hello(datagram: bytes) -> ClientHello | None:
    """The ClientHello that starts the datagram: unfragmented, epoch 0, its fields up to the
    compression methods well formed; None for anything else (fragmented, truncated, malformed).
    OpenSSL does not take fragmented ClientHellos before the cookie exchange either."""
    if not is_client_hello(datagram) or len(datagram) < HEADER + 12:
        return None
    record_end = HEADER + int.from_bytes(datagram[11:13], "big")
    hs = datagram[HEADER:record_end]
    length = int.from_bytes(hs[1:4], "big")
    if hs[6:9] != b"\x00\x00\x00" or int.from_bytes(hs[9:12], "big") != length or len(hs) < 12 + length:
        return None
    body = hs[12:12 + length]
    n = len(body)
    pos = 2 + 32                                        # client_version, random
    if n < pos + 1 or body[pos] > 32:
        return None
    sid_end = pos + 1 + body[pos]                       # session_id<0..32>
    if n < sid_end + 1:
        return None
    cookie_end = sid_end + 1 + body[sid_end]            # cookie<0..2^8-1>
    if n < cookie_end + 2:
        return None
    suites_len = int.from_bytes(body[cookie_end:cookie_end + 2], "big")
    suites_end = cookie_end + 2 + suites_len            # cipher_suites<2..2^16-2>
    if suites_len < 2 or suites_len % 2 or n < suites_end + 1:
        return None
    comp_end = suites_end + 1 + body[suites_end]        # compression_methods<1..2^8-1>
    if body[suites_end] < 1 or n < comp_end:
        return None
    return ClientHello(datagram[5:11], hs[4:6], body[2:34], body[sid_end + 1:cookie_end],
                       body[:sid_end] + body[cookie_end:comp_end])


def hello_verify_request(record_seq: bytes, message_seq: bytes, cookie: bytes) -> bytes:
    """A HelloVerifyRequest record (RFC 6347 4.2.1): same record sequence number as the
    ClientHello, server_version DTLS 1.0 as the RFC recommends, the cookie."""
    body = DTLS10 + bytes([len(cookie)]) + cookie
    n = len(body).to_bytes(3, "big")
    hs = bytes([HS_HELLO_VERIFY_REQUEST]) + n + message_seq + b"\x00\x00\x00" + n + body
    return bytes([CT_HANDSHAKE]) + DTLS10 + b"\x00\x00" + record_seq + len(hs).to_bytes(2, "big") + hs
