"""Stateless DTLS cookies (RFC 6347 §4.2.1), bound to the peer and to its ClientHello.

    cookie = HMAC-SHA256(secret, len(peer) || peer || params)[:16]

`peer` is the source address and port (`repr` of the address tuple, with its length in two bytes
in front), `params` the ClientHello's client_version, random, session_id, cipher_suites and
compression_methods exactly as on the wire, each with its length (`records.ClientHello.params`).
The extensions and the cookie itself are not covered. A cookie therefore only opens a
handshake for the ClientHello it was made for, from the address it was sent to: a client must
repeat those fields unchanged in its second ClientHello, as the RFC requires.

The 32-byte secret rotates every `rotation` seconds and the previous one is still accepted, so
a cookie is valid for one to two rotation periods. A verbatim replay within that time is not
caught here; the engine catches it by the ClientHello's random (see engine.py).
"""

from __future__ import annotations

import hmac
from typing import Callable, Hashable

COOKIE_BYTES = 16


def bind(peer: Hashable, params: bytes) -> bytes:
    """The bytes a cookie is computed over."""
    p = repr(peer).encode()
    return len(p).to_bytes(2, "big") + p + params


class Cookies:
    def __init__(self, rotation: float, rand_bytes: Callable[[int], bytes]) -> None:
        self.rotation = rotation
        self._rand = rand_bytes
        self._secrets = [rand_bytes(32), rand_bytes(32)]     # current, previous
        self._epoch: int | None = None

    def rotate(self, now: float) -> None:
        epoch = int(now // self.rotation)
        if self._epoch is None:
            self._epoch = epoch
        elif epoch > self._epoch:
            self._secrets = [self._rand(32), self._secrets[0] if epoch == self._epoch + 1 else self._rand(32)]
            self._epoch = epoch

    def make(self, bound: bytes) -> bytes:
        return hmac.digest(self._secrets[0], bound, "sha256")[:COOKIE_BYTES]

    def check(self, cookie: bytes, bound: bytes) -> bool:
        return len(cookie) == COOKIE_BYTES and any(
            hmac.compare_digest(cookie, hmac.digest(secret, bound, "sha256")[:COOKIE_BYTES])
            for secret in self._secrets)
