"""DTLS record framing: just enough to split a flight and pack records into datagrams.

OpenSSL hands a whole flight to the memory BIO at once (several records, possibly more than the
path MTU). Records may share a datagram but must not be split across two (RFC 6347 4.1.1), so
flights are cut at record boundaries and packed greedily into datagrams of at most `mtu` bytes.
"""

from __future__ import annotations

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
