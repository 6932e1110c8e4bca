"""Stateless DTLS cookies (RFC 6347 §4.2.1), bound to the peer and to its ClientHello, and the
memory of the ClientHellos whose cookie already opened a handshake.

    cookie = HMAC-SHA256(secret, len(peer) || peer || params)[:16]

`peer` is the source address and port (`repr` of the address tuple, with its length in two bytes
in front), `params` the ClientHello's client_version, random, session_id, cipher_suites and
compression_methods exactly as on the wire, each with its length (`records.ClientHello.params`).
The extensions and the cookie itself are not covered. A cookie therefore only opens a
handshake for the ClientHello it was made for, from the address it was sent to: a client must
repeat those fields unchanged in its second ClientHello, as the RFC requires.

The 32-byte secret rotates every `rotation` seconds (counted from the previous rotation) and the
previous one is still accepted, so a cookie is valid for one to two rotation periods. Within that time a verbatim replay of a
ClientHello-with-cookie would pass the check again; so the engine `remember`s every one that
opened a handshake (by peer and random, `hello_key`) and drops one `seen` before. The memory is
two sets that rotate with the secrets: see `remember` for why that is enough, and its bound.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Callable, Hashable

COOKIE_BYTES = 16

# ClientHellos remembered under one secret, at most. The set must hold every handshake started
# while its secret is current; when it is full the secrets rotate early (see `remember`), which
# shortens the life of the cookies already sent. A worker starts at most ~5,000 handshakes a
# second (0.19 ms of CPU each for the first flight: benchmarks/bench_dtls_engine.py), so 100,000
# lasts at least 20 s of a flat-out flood, and below ~1,700 handshakes a second (100,000 per 60 s
# rotation) there is never an early rotation:
# cookies keep their full life far beyond any device's round trip. A cap tied to the half-open
# cap (4 x 1,000) would rotate every second under a flood, below a slow device's round trip.
# Memory: ~90 bytes an entry, two sets, at most ~18 MB, only reached under such a flood.
REPLAY_MEMORY = 100_000


def bind(peer: Hashable, params: bytes) -> bytes:
    """The bytes a cookie is computed over."""
    p = repr(peer).encode()
    return len(p).to_bytes(2, "big") + p + params


def hello_key(peer: Hashable, random: bytes) -> bytes:
    """What a ClientHello is remembered by: its random from that peer, in 16 bytes."""
    return hashlib.blake2b(random + repr(peer).encode(), digest_size=16).digest()


class Cookies:
    def __init__(self, rotation: float, rand_bytes: Callable[[int], bytes], capacity: int = REPLAY_MEMORY) -> None:
        self.rotation = rotation
        self.capacity = capacity
        self.early_rotations = 0
        self._rand = rand_bytes
        self._secrets = [rand_bytes(32), rand_bytes(32)]     # current, previous
        self._seen: list[set[bytes]] = [set(), set()]        # remembered under each of them
        # when the current secret became current. Rotations are at least `rotation` apart counted
        # from the last one, early ones included, so a timed rotation never follows an early one
        # at once: a cookie lives at least one period unless the memory fills again within it
        self._since: float | None = None

    def rotate(self, now: float) -> None:
        if self._since is None:
            self._since = now
        elif now - self._since >= 2 * self.rotation:
            # two periods without a look: no cookie of either secret may still be valid
            self._secrets = [self._rand(32), self._rand(32)]
            self._seen = [set(), set()]
            self._since = now
        elif now - self._since >= self.rotation:
            self._advance(now)

    def _advance(self, now: float) -> None:
        self._secrets = [self._rand(32), self._secrets[0]]
        self._seen = [set(), self._seen[0]]
        self._since = now

    def make(self, bound: bytes) -> bytes:
        return hmac.digest(self._secrets[0], bound, "sha256")[:COOKIE_BYTES]

    def check(self, cookie: bytes, bound: bytes) -> bool:
        return len(cookie) == COOKIE_BYTES and any(
            hmac.compare_digest(cookie, hmac.digest(secret, bound, "sha256")[:COOKIE_BYTES])
            for secret in self._secrets)

    def seen(self, key: bytes) -> bool:
        return key in self._seen[0] or key in self._seen[1]

    def remember(self, key: bytes, now: float) -> None:
        """Remember a ClientHello whose valid cookie opened a handshake, in the set of the secret
        current now.

        Why two sets suffice. Number the secrets S0, S1, ... in the order they become current;
        only the current S(k) and the previous S(k-1) are ever live, and a set is dropped exactly
        when its secret is. A ClientHello remembered now, while S(j) is current, carried a cookie
        made under S(c) with c <= j (it was valid: c is j or j-1). A replay of it is let through
        only if that cookie is still valid, i.e. S(c) is still live; then S(j), no older than S(c),
        is live too, and so is the set that holds it: the replay is seen. Once S(c) is gone the
        replay's cookie fails the check and it gets a HelloVerifyRequest, no state.

        The bound: when the current set is full, the secrets rotate early (a new current secret,
        the current one becomes the previous, the previous one and its set are dropped). That is
        one more step of the same sequence, so the argument above holds unchanged; it only
        shortens the life of the cookies made under the dropped secret, and the next timed rotation is
        a full period after this one. Each set holds at most `capacity` entries: a new one goes into
        the current set only, after the early rotation."""
        if len(self._seen[0]) >= self.capacity:
            self._advance(now)
            self.early_rotations += 1
        self._seen[0].add(key)
