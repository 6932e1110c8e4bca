"""A sans-I/O DTLS 1.2 engine on pyOpenSSL memory BIOs.

No sockets and no clock inside: every call takes the current monotonic time `now` (seconds) and
returns an `Output` of datagrams to send and events for the application; `next_deadline()` says
when `handle_timeouts` must be called next. The asyncio transport (`transport.py`) only moves
datagrams and sleeps until deadlines; tests drive the same engine over a fake network.

Server side, in order of arrival of a datagram from an unknown address:
1. Only an epoch-0 ClientHello is looked at; anything else is dropped.
2. Stateless cookie exchange (RFC 6347 4.2.1): the engine answers with a HelloVerifyRequest
   (never larger than the ClientHello) and keeps nothing. No per-peer state exists until a
   ClientHello comes back with a valid cookie (cookies.py: an HMAC of the peer address and the
   ClientHello's parameters under a secret that rotates; a cookie lives one to two rotations).
   A ClientHello the engine cannot parse (fragmented, malformed) is dropped.
3. A valid cookie whose ClientHello (peer and random) already opened a handshake is a replay:
   dropped, no answer (cookies.py remembers them as long as their cookie can be valid).
4. Caps: half-open handshakes in all and per source address, sessions, and a rate of new
   handshakes per source address; beyond them, a valid ClientHello is dropped (the client
   retransmits it later). "Address" is an IPv4 address or an IPv6 prefix (limits.address_key).
5. The peer's certificate chain is validated by OpenSSL against the trust anchors, then by the
   `Authenticator` (cryptography.x509.verification + registry revocation). A refusal fails the
   handshake inside OpenSSL, which sends the peer an alert.
6. Timers: handshake timeout, idle timeout, and OpenSSL's retransmission timer.

A ClientHello from an address:port that has an established session (RFC 6347 4.2.8): one that
repeats the random of the handshake that made the session is a replay and gets no answer at
all. Any other goes through the cookie exchange (and 3. and 4.), then runs as a *pending*
handshake beside the session (a half-open handshake like any other): the session's own epoch-1
records still reach it, every record it cannot open goes to the pending handshake, and a
retransmission of the pending handshake's own ClientHello goes to it (OpenSSL answers it with
its flight again). Only when the pending handshake completes does it replace the session (`SessionClosed(peer, "replaced by a new handshake")`,
then `HandshakeComplete`); if it fails or times out, the session is untouched.

Note: OpenSSL runs its retransmission timer on its own clock; `now` drives everything else.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol

from cryptography import x509
from OpenSSL import SSL

from devid.gateway.dtls import records
from devid.gateway.dtls.cookies import Cookies, bind, hello_key
from devid.gateway.dtls.limits import HandshakeRate, LimitError, ServerLimits, address_key  # noqa: F401  (LimitError: API)
from devid.gateway.dtls.recordlayer import RecordLayer

Peer = Hashable          # e.g. ("127.0.0.1", 40000) for UDP
CLOSE_NOTIFY = b"\x01\x00"   # alert level warning, description close_notify

HANDSHAKING = "handshaking"
ESTABLISHED = "established"
CLOSED = "closed"

# X509_V_ERR_* codes worth a readable name in logs
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate", 7: "certificate signature failure", 9: "certificate not yet valid",
    10: "certificate has expired", 18: "self-signed certificate", 19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate", 21: "unable to verify the first certificate",
    22: "certificate chain too long", 24: "invalid CA certificate", 25: "path length constraint exceeded",
    26: "unsupported certificate purpose", 28: "certificate rejected",
}


# -- events -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HandshakeComplete:
    peer: Peer
    identity: Any            # what the Authenticator returned
    resumed: bool
    cipher: str | None


@dataclass(frozen=True)
class HandshakeFailed:
    peer: Peer
    reason: str


@dataclass(frozen=True)
class ApplicationData:
    peer: Peer
    data: bytes


@dataclass(frozen=True)
class SessionClosed:
    peer: Peer
    reason: str


Event = HandshakeComplete | HandshakeFailed | ApplicationData | SessionClosed


@dataclass
class Output:
    datagrams: list[tuple[Peer, bytes]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def extend(self, other: "Output") -> "Output":
        self.datagrams.extend(other.datagrams)
        self.events.extend(other.events)
        return self


class Authenticator(Protocol):
    def authenticate(self, leaf: x509.Certificate, intermediates: list[x509.Certificate]) -> Any:
        """Return the peer's identity, or raise an exception whose text is the refusal reason."""


@dataclass
class EngineStats:
    cookies_sent: int = 0
    cookies_refused: int = 0
    dropped: int = 0                    # datagrams dropped before any state (not a ClientHello, global caps)
    dropped_per_address: int = 0        # valid-cookie ClientHellos dropped by a per-address (or IPv6 network) cap
    rate_limited: int = 0               # valid-cookie ClientHellos dropped by the per-address handshake rate
    replays: int = 0                    # ClientHellos repeating the random of their peer's session, or
                                        # with a valid cookie that already opened a handshake: no answer
    replaced: int = 0                   # established sessions replaced by a completed handshake of their peer
    handshakes: int = 0
    resumed: int = 0
    failed: int = 0


class _Session:
    __slots__ = ("peer", "conn", "state", "identity", "chain", "failure", "started", "last_seen",
                 "hs_deadline", "deadline", "cipher", "rl", "wseq", "rseqs", "last_flight", "resend_at",
                 "hello_random", "bound", "pending", "address", "network")

    def __init__(self, peer: Peer, conn: SSL.Connection, now: float, hs_deadline: float) -> None:
        self.peer = peer
        self.conn = conn
        self.state = HANDSHAKING
        self.identity: Any = None
        self.chain: list[Any] = []            # server: OpenSSL X509 objects; client: cryptography ones
        self.failure: str | None = None
        self.started = now
        self.last_seen = now
        self.hs_deadline = hs_deadline
        self.deadline: float | None = None
        self.cipher: str | None = None
        # after the handshake: our own record layer replaces the OpenSSL object (recordlayer.py)
        self.rl: RecordLayer | None = None
        self.wseq = -1                       # highest epoch-1 sequence number OpenSSL sent
        self.rseqs: list[int] = []           # epoch-1 sequence numbers fed to OpenSSL
        self.last_flight: list[bytes] | None = None   # our final handshake flight, for retransmission
        self.resend_at = 0.0
        # server: the ClientHello's random (a replay repeats it), what its cookie was bound to
        # (until the handshake is done), and a handshake running beside this established session
        self.hello_random: bytes | None = None
        self.bound: bytes | None = None
        self.pending: _Session | None = None
        self.address: Hashable = None        # server: what the per-address half-open cap counts it by
        self.network: Hashable = None        # server: its IPv6 network (None for IPv4), counted too


class _Probe:
    """app_data of the connection during DTLSv1_listen (its cookie callback needs `bound`)."""
    __slots__ = ("peer", "bound")

    def __init__(self, peer: Peer, bound: bytes) -> None:
        self.peer = peer
        self.bound = bound


class _Engine:
    """What server and client share: draining the BIO into datagrams, reading plaintext, and the
    bookkeeping for handing an established session to our record layer."""

    mtu: int
    _takes_over: bool          # does this engine move established sessions to the record layer?

    def _flush(self, s: _Session, out: Output) -> None:
        chunks = []
        while True:
            try:
                chunk = s.conn.bio_read(65536)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        if chunks:
            first = len(out.datagrams)
            for datagram in records.pack_datagrams(b"".join(chunks), self.mtu):
                out.datagrams.append((s.peer, datagram))
            if self._takes_over and s.state == HANDSHAKING:    # follow OpenSSL's epoch-1 write sequence
                for _, dg in out.datagrams[first:]:
                    for r in records.split_records(dg):
                        if r[3:5] == b"\x00\x01":
                            s.wseq = max(s.wseq, int.from_bytes(r[5:11], "big"))

    def _note_read_seqs(self, s: _Session, datagram: bytes) -> None:
        """Epoch-1 records OpenSSL reads during the handshake (the peer's Finished): the record
        layer's replay window must start with them."""
        if self._takes_over and s.state == HANDSHAKING:
            s.rseqs.extend(int.from_bytes(r[5:11], "big") for r in records.split_records(datagram)
                           if r[3:5] == b"\x00\x01")

    @staticmethod
    def _record_layer(s: _Session, server: bool) -> RecordLayer:
        """Our record layer for an established session, continuing OpenSSL's sequence numbers."""
        conn = s.conn
        rl = RecordLayer(s.cipher, conn.master_key(), conn.client_random(), conn.server_random(), server=server,
                         write_seq=s.wseq + 1)
        for seq in s.rseqs:
            rl.mark(seq)
        s.rseqs = []
        return rl

    def _read_plaintext(self, s: _Session, out: Output) -> None:
        while s.state == ESTABLISHED:
            try:
                data = s.conn.recv(65536)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                # close_notify from the peer: answer it (lets the peer resume by session ID later)
                try:
                    s.conn.shutdown()
                except SSL.Error:
                    pass
                self._flush(s, out)
                self._end(s, out, "closed by peer")
                return
            except SSL.Error as exc:
                self._flush(s, out)
                self._end(s, out, f"DTLS error: {_ssl_reason(exc)}")
                return
            out.events.append(ApplicationData(s.peer, data))

    def _end(self, s: _Session, out: Output, reason: str) -> None:
        raise NotImplementedError


def _ssl_reason(exc: Exception) -> str:
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        return "; ".join(str(e[-1]) for e in args[0] if e)
    return str(exc) or exc.__class__.__name__


class ServerEngine(_Engine):
    _takes_over = True          # every established session with a supported suite

    def __init__(self, context: SSL.Context, authenticator: Authenticator, limits: ServerLimits = ServerLimits(),
                 rand_bytes: Callable[[int], bytes] = os.urandom) -> None:
        """`context` must be a fresh DTLS server Context (see `contexts.server_context`); the engine
        installs its cookie and verify callbacks on it."""
        self.ctx = context
        self.authenticator = authenticator
        self.limits = limits
        self.mtu = limits.mtu
        self.sessions: dict[Peer, _Session] = {}       # one per peer: established or handshaking
        self.stats = EngineStats()
        self.cookies = Cookies(limits.cookie_rotation, rand_bytes)
        self._now = 0.0
        self._heap: list[tuple[float, int, Peer]] = []
        self._tiebreak = itertools.count()
        self._half_open = 0
        self._half_open_by_address: dict[Hashable, int] = {}
        self._rate = HandshakeRate(limits.handshake_rate_per_address, limits.handshake_burst_per_address)
        self._by_device: dict[Any, list[_Session]] = {}   # device key -> its established sessions, oldest first
        context.set_cookie_generate_callback(self._cookie_generate)
        context.set_cookie_verify_callback(self._cookie_verify)
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)

    # -- cookies: OpenSSL checks them again in DTLSv1_listen and in the handshake ------------------

    def _cookie_generate(self, conn: SSL.Connection) -> bytes:
        return self.cookies.make(getattr(conn.get_app_data(), "bound", None) or b"")

    def _cookie_verify(self, conn: SSL.Connection, cookie: bytes) -> bool:
        bound = getattr(conn.get_app_data(), "bound", None)
        return bound is not None and self.cookies.check(cookie, bound)

    # -- certificate verification (inside the handshake) ----------------------------------------

    def _verify(self, conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
        s = conn.get_app_data()
        if not isinstance(s, _Session):
            return False
        if not ok:
            s.failure = f"certificate refused by OpenSSL: {_VERIFY_ERRORS.get(errno, f'X509 error {errno}')}"
            return False
        # OpenSSL reports the chain from the trust anchor down to the leaf (depth 0). The anchor
        # (top) is one of the verifier's own anchors too, so only the certificates below it are
        # converted (each to_cryptography() is a DER round trip, ~65 us measured).
        s.chain.append(cert)
        if depth > 0:
            return True
        leaf = cert.to_cryptography()
        intermediates = [c.to_cryptography() for c in reversed(s.chain[1:-1])]
        try:
            s.identity = self.authenticator.authenticate(leaf, intermediates)
        except Exception as exc:      # any refusal, including unexpected ones, fails the handshake
            s.failure = str(exc) or exc.__class__.__name__
            return False
        return True

    # -- the API -------------------------------------------------------------------------------

    @property
    def half_open(self) -> int:
        return self._half_open

    def receive(self, peer: Peer, datagram: bytes, now: float) -> Output:
        self._now = now
        out = Output()
        s = self.sessions.get(peer)
        if s is None:
            self._hello(peer, datagram, None, out)     # anything but a ClientHello is dropped there
            return out
        if s.state == ESTABLISHED:
            if datagram[:1] == b"\x16" and records.is_client_hello(datagram):
                self._hello(peer, datagram, s, out)
                return out
            if s.pending is not None:
                self._receive_beside(s, datagram, out)
                return out
            s.last_seen = now
            if s.rl is not None:                 # the common case: an established session's records
                self._receive_records(s, datagram, out)
                self._schedule(s, now)
                return out
        else:
            s.last_seen = now
        self._to_openssl(s, datagram, out)
        return out

    def _to_openssl(self, s: _Session, datagram: bytes, out: Output) -> None:
        self._note_read_seqs(s, datagram)
        try:
            s.conn.bio_write(datagram)
        except SSL.Error:
            return
        self._drive(s, out)

    def _hello(self, peer: Peer, datagram: bytes, established: _Session | None, out: Output) -> None:
        """A datagram from a peer with no session, or a ClientHello beside its `established`
        session. Only a ClientHello the engine can parse is looked at."""
        hello = records.parse_client_hello(datagram)
        if hello is None:
            self.stats.dropped += 1
            return
        if established is not None:
            if hello.random == established.hello_random:
                self.stats.replays += 1          # a replay of the ClientHello that made the session
                return
            p = established.pending
            if p is not None and hello.random == p.hello_random:
                p.last_seen = self._now           # the pending handshake's client retransmits
                self._to_openssl(p, datagram, out)
                return
        self.cookies.rotate(self._now)
        bound = bind(peer, hello.params)
        if not self.cookies.check(hello.cookie, bound):
            # the common case of a first ClientHello, answered without touching OpenSSL
            reply = records.hello_verify_request(hello.record_seq, hello.message_seq, self.cookies.make(bound))
            if len(reply) <= len(datagram):     # never amplify
                out.datagrams.append((peer, reply))
                self.stats.cookies_sent += 1
            else:
                self.stats.cookies_refused += 1
            return
        # a valid cookie: not a replay of one that opened a handshake already (its retransmission
        # by a client whose handshake is in progress went to that handshake above, or never came
        # here), then the caps and the rate, then (only now) state for the peer
        seen = hello_key(peer, hello.random)
        if self.cookies.seen(seen):
            self.stats.replays += 1
            return
        address = address_key(peer, self.limits.ipv6_prefix_length)
        if self._half_open_by_address.get(address, 0) >= self.limits.max_half_open_per_address:
            self.stats.dropped_per_address += 1
            return
        network = None                    # an IPv6 prefix: its network's /64s share a cap too
        if isinstance(address, str) and "/" in address:
            network = address_key(peer, min(self.limits.ipv6_network_prefix_length, self.limits.ipv6_prefix_length))
            if self._half_open_by_address.get(network, 0) >= self.limits.max_half_open_per_ipv6_network:
                self.stats.dropped_per_address += 1
                return
        if self._half_open >= self.limits.max_half_open or (
                established is None and len(self.sessions) >= self.limits.max_sessions):
            self.stats.dropped += 1
            return
        if not self._rate.admit(network or address, self._now):       # IPv6: per network
            self.stats.rate_limited += 1
            return
        conn = SSL.Connection(self.ctx, None)
        conn.set_app_data(_Probe(peer, bound))
        conn.set_accept_state()
        try:
            conn.bio_write(datagram)
            conn.DTLSv1_listen()          # checks the cookie again (callback)
        except SSL.WantReadError:         # OpenSSL answered with a cookie of its own
            reply = self._drain(conn)
            if reply and len(reply) <= len(datagram):
                out.datagrams.append((peer, reply))
                self.stats.cookies_sent += 1
            else:
                self.stats.cookies_refused += 1
            return
        except SSL.Error:
            self.stats.dropped += 1
            return
        conn.set_ciphertext_mtu(self.mtu)
        s = _Session(peer, conn, self._now, self._now + self.limits.handshake_timeout)
        s.hello_random = hello.random
        s.bound = bound
        s.address = address
        s.network = network
        conn.set_app_data(s)
        if established is None:
            self.sessions[peer] = s
        else:                             # beside the session, which it replaces only once complete
            if established.pending is not None:     # its client gave up on it and started again
                self.stats.failed += 1
                out.events.append(HandshakeFailed(peer, "superseded by a newer handshake"))
                self._end(established.pending, out, "superseded by a newer handshake", emit=False)
            established.pending = s
        self._half_open += 1
        counts = self._half_open_by_address
        counts[address] = counts.get(address, 0) + 1
        if network is not None and network != address:
            counts[network] = counts.get(network, 0) + 1
        self._drive(s, out)
        # only now: remembering may rotate the secrets early, and OpenSSL checks the cookie again
        # when the handshake reads the ClientHello (in the _drive above)
        self.cookies.remember(seen, self._now)

    def _receive_beside(self, s: _Session, datagram: bytes, out: Output) -> None:
        """A datagram for a peer with an established session `s` and a handshake pending beside
        it: the session gets the records it can open, the pending handshake all others."""
        p = s.pending
        p.last_seen = self._now
        if s.rl is not None:
            rest: list[bytes] = []
            self._receive_records(s, datagram, out, rest)
            if s.state == ESTABLISHED:
                s.last_seen = self._now
                self._schedule(s, self._now)
            if rest and p.state == HANDSHAKING:
                self._to_openssl(p, b"".join(rest), out)
            return
        # OpenSSL still holds the session (a suite the record layer lacks): it drops epoch-1
        # records it cannot open, so those go to both; epoch 0 is the new handshake's alone
        epoch1 = b"".join(r for r in records.split_records(datagram) if r[3:5] == b"\x00\x01")
        if epoch1:
            s.last_seen = self._now
            self._to_openssl(s, epoch1, out)
        if p.state == HANDSHAKING:
            self._to_openssl(p, datagram, out)

    def send(self, peer: Peer, data: bytes, now: float) -> Output:
        """Encrypt one application message (one record). Raises KeyError for an unknown peer and
        ValueError for a message that would not fit the MTU (use CoAP block-wise transfer)."""
        self._now = now
        s = self.sessions[peer]
        if s.state != ESTABLISHED:
            raise KeyError(peer)
        limit = self.mtu - s.rl.overhead() if s.rl is not None else s.conn.get_cleartext_mtu()
        if len(data) > limit:
            raise ValueError(f"message of {len(data)} bytes exceeds the DTLS record payload limit {limit}")
        out = Output()
        s.last_seen = now
        if s.rl is not None:
            out.datagrams.append((peer, s.rl.seal(records.CT_APPLICATION_DATA, data)))
        else:
            s.conn.write(data)
            self._flush(s, out)
        self._schedule(s, now)
        return out

    def close(self, peer: Peer, now: float, reason: str = "closed by server") -> Output:
        """Send close_notify and forget the peer's session (and a handshake pending beside it)."""
        self._now = now
        out = Output()
        s = self.sessions.get(peer)
        if s is None:
            return out
        if s.pending is not None:
            self._close(s.pending, out, reason)
        self._close(s, out, reason)
        return out

    def next_deadline(self) -> float | None:
        while self._heap:
            when, _, peer = self._heap[0]
            s = self.sessions.get(peer)
            if s is not None and (s.deadline == when or (s.pending is not None and s.pending.deadline == when)):
                return when
            heapq.heappop(self._heap)            # stale entry
        return None

    def handle_timeouts(self, now: float) -> Output:
        self._now = now
        out = Output()
        while self._heap and self._heap[0][0] <= now:
            when, _, peer = heapq.heappop(self._heap)
            s = self.sessions.get(peer)
            if s is None:
                continue
            p = s.pending
            if s.deadline == when:
                self._timeout(s, now, out)
            if p is not None and p.deadline == when:
                self._timeout(p, now, out)
        return out

    def _timeout(self, s: _Session, now: float, out: Output) -> None:
        s.deadline = None
        if s.state == HANDSHAKING:
            if now >= s.hs_deadline:
                self.stats.failed += 1
                out.events.append(HandshakeFailed(s.peer, "handshake timeout"))
                self._end(s, out, "handshake timeout", emit=False)
                return
            try:
                s.conn.DTLSv1_handle_timeout()       # retransmits the last flight if due
            except SSL.Error as exc:
                self._fail(s, out, _ssl_reason(exc))
                return
            self._flush(s, out)
        elif s.state == ESTABLISHED and now >= s.last_seen + self.limits.idle_timeout:
            self._close(s, out, "idle timeout")
            return
        self._schedule(s, now)

    # -- internals ---------------------------------------------------------------------------

    def _schedule(self, s: _Session, now: float) -> None:
        if s.state == HANDSHAKING:
            when = s.hs_deadline
            retransmit = s.conn.DTLSv1_get_timeout()
            if retransmit is not None:
                when = min(when, now + retransmit)
        elif s.state == ESTABLISHED:
            # rounded up to a step (1 s, or an eighth of a short idle timeout): the datagrams of a
            # busy session then leave its deadline, and the timer heap, alone
            step = min(1.0, self.limits.idle_timeout / 8)
            exact = s.last_seen + self.limits.idle_timeout
            when = max(exact, math.ceil(exact / step) * step)      # never before it, despite rounding
        else:
            return
        if s.deadline != when:
            s.deadline = when
            heapq.heappush(self._heap, (when, next(self._tiebreak), s.peer))

    def _drive(self, s: _Session, out: Output) -> None:
        first = len(out.datagrams)
        if s.state == HANDSHAKING:
            try:
                s.conn.do_handshake()
            except SSL.WantReadError:
                self._flush(s, out)
                self._schedule(s, self._now)
                return
            except SSL.Error as exc:
                self._fail(s, out, s.failure or _ssl_reason(exc))
                return
            self._flush(s, out)
            resumed = s.identity is None   # the verify callback does not run on resumption
            if resumed:
                try:
                    leaf = s.conn.get_peer_certificate(as_cryptography=True)
                    if leaf is None:
                        raise ValueError("no peer certificate in the resumed session")
                    s.identity = self.authenticator.authenticate(leaf, [])
                except Exception as exc:
                    self._close(s, out, "refused on resumption")
                    self.stats.failed += 1
                    out.events.append(HandshakeFailed(s.peer, f"resumed session refused: {exc}"))
                    return
            old = self.sessions.get(s.peer)
            if old is not s and old is not None:
                # it ran beside an established session: now complete, it replaces it (RFC 6347 4.2.8)
                old.pending = None
                self._end(old, out, "replaced by a new handshake")
                self.sessions[s.peer] = s
                self.stats.replaced += 1
            self._leave_half_open(s)
            s.state = ESTABLISHED
            s.cipher = s.conn.get_cipher_name()
            s.chain = []                       # only needed during the handshake
            s.bound = None
            self.stats.handshakes += 1
            self.stats.resumed += resumed
            out.events.append(HandshakeComplete(s.peer, s.identity, resumed, s.cipher))
            self._count_device(s, out)
            self._read_plaintext(s, out)
            self._flush(s, out)
            if s.state == ESTABLISHED:
                self._take_over(s, [dg for p, dg in out.datagrams[first:] if p == s.peer])
            self._schedule(s, self._now)
            return
        self._read_plaintext(s, out)
        self._flush(s, out)
        self._schedule(s, self._now)

    def _take_over(self, s: _Session, final_flight: list[bytes]) -> None:
        """Replace the OpenSSL object of an established session by our record layer."""
        if not RecordLayer.supports(s.cipher) or s.wseq < 0:
            return
        conn = s.conn
        s.rl = self._record_layer(s, server=True)
        s.last_flight = final_flight or None
        conn.set_app_data(None)
        s.conn = None

    def _receive_records(self, s: _Session, datagram: bytes, out: Output, rest: list[bytes] | None = None) -> None:
        """The records of an established session on our record layer. With `rest` (a handshake
        is pending beside the session), epoch-0 records and those the session cannot open are
        put there instead of being dropped."""
        rl = s.rl
        for rec in records.split_records(datagram):
            if rec[3:5] != b"\x00\x01":
                if rest is not None:
                    rest.append(rec)
                # epoch 0 after the handshake: the peer is retransmitting its last flight because
                # ours was lost; send ours again (at most once a second)
                elif rec[0] in (records.CT_HANDSHAKE, records.CT_CHANGE_CIPHER_SPEC):
                    self._resend_final_flight(s, out)
                continue
            opened = rl.open(rec)
            if opened is None:
                if rest is not None:
                    rest.append(rec)
                continue
            ctype, plaintext = opened
            if ctype == records.CT_APPLICATION_DATA:
                s.last_flight = None          # the peer has our Finished
                out.events.append(ApplicationData(s.peer, plaintext))
            elif ctype == records.CT_ALERT:
                if plaintext == CLOSE_NOTIFY:
                    out.datagrams.append((s.peer, rl.seal(records.CT_ALERT, CLOSE_NOTIFY)))
                    self._end(s, out, "closed by peer")
                else:
                    self._end(s, out, f"alert from peer: {plaintext.hex()}")
                return
            elif ctype == records.CT_HANDSHAKE:
                self._resend_final_flight(s, out)     # a retransmitted Finished

    def _resend_final_flight(self, s: _Session, out: Output) -> None:
        if s.last_flight and self._now >= s.resend_at:
            s.resend_at = self._now + 1.0
            out.datagrams.extend((s.peer, dg) for dg in s.last_flight)

    def _fail(self, s: _Session, out: Output, reason: str) -> None:
        self._flush(s, out)        # the alert OpenSSL queued
        self.stats.failed += 1
        out.events.append(HandshakeFailed(s.peer, reason))
        self._end(s, out, reason, emit=False)

    def _close(self, s: _Session, out: Output, reason: str) -> None:
        """close_notify (or OpenSSL's shutdown) for one session or handshake, then forget it."""
        if s.rl is not None:
            if s.state == ESTABLISHED:
                out.datagrams.append((s.peer, s.rl.seal(records.CT_ALERT, CLOSE_NOTIFY)))
        elif s.conn is not None:
            try:
                s.conn.shutdown()
            except SSL.Error:
                pass
            self._flush(s, out)
        self._end(s, out, reason)

    def _leave_half_open(self, s: _Session) -> None:
        self._half_open -= 1
        counts = self._half_open_by_address
        keys = (s.address,) if s.network is None or s.network == s.address else (s.address, s.network)
        for key in keys:
            n = counts[key] - 1
            if n:
                counts[key] = n
            else:
                del counts[key]

    @staticmethod
    def _device_key(s: _Session) -> Any:
        """What the session cap counts by: the device (its serial), so that its factory and
        operational certificates, and every certificate it was ever issued, share one budget;
        an identity without a serial counts by its certificate fingerprint."""
        serial = getattr(s.identity, "serial", None)
        if serial is not None:
            return ("device", serial)
        fingerprint = getattr(s.identity, "fingerprint", None)
        return ("certificate", fingerprint) if fingerprint is not None else None

    def _count_device(self, s: _Session, out: Output) -> None:
        """One device may hold at most `max_sessions_per_device` established sessions: a stolen
        or buggy identity, or one device with many certificates, cannot fill the gateway's session
        table (and its per-session caches) from many source ports. The oldest goes first, so a
        device that lost track of its sessions still gets in."""
        key = self._device_key(s)
        if key is None:
            return
        mine = self._by_device.setdefault(key, [])
        mine.append(s)
        while len(mine) > self.limits.max_sessions_per_device:
            oldest = mine[0]
            self._close(oldest, out, "too many sessions for this device")    # removes it from `mine`
            if mine and mine[0] is oldest:
                mine.pop(0)

    def _end(self, s: _Session, out: Output, reason: str, emit: bool = True) -> None:
        peer = s.peer
        current = self.sessions.get(peer)
        if current is s:
            if s.pending is not None:     # the handshake pending beside it carries on alone
                self.sessions[peer] = s.pending
                s.pending = None
            else:
                del self.sessions[peer]
        elif current is not None and current.pending is s:
            current.pending = None
        if s.state == HANDSHAKING:
            self._leave_half_open(s)
        elif s.state == ESTABLISHED:
            key = self._device_key(s)
            mine = self._by_device.get(key) if key is not None else None
            if mine is not None:
                try:
                    mine.remove(s)
                except ValueError:
                    pass
                if not mine:
                    del self._by_device[key]
            if emit:
                out.events.append(SessionClosed(peer, reason))
        s.state = CLOSED
        s.deadline = None
        if s.conn is not None:
            s.conn.set_app_data(None)

    @staticmethod
    def _drain(conn: SSL.Connection) -> bytes:
        chunks = []
        while True:
            try:
                chunk = conn.bio_read(65536)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


class ClientEngine(_Engine):
    """One DTLS client session to one server (the device side)."""

    def __init__(self, context: SSL.Context, peer: Peer, *, mtu: int = 1280,
                 handshake_timeout: float = 30.0, session: SSL.Session | None = None,
                 server_check: Callable[[x509.Certificate, list[x509.Certificate]], Any] | None = None,
                 certificate: Any = None, private_key: Any = None, takeover: bool = False) -> None:
        """`certificate` and `private_key` (cryptography or pyOpenSSL objects), when given, are this
        connection's identity instead of the Context's: one Context then serves many devices whose
        certificates share the Context's extra chain certificates and trust anchors.
        `takeover`: once the handshake is complete, application records go through our record
        layer (recordlayer.py) instead of OpenSSL, as on the server (less CPU per message)."""
        self.mtu = mtu
        self._takes_over = takeover
        self.peer = peer
        self.context = context
        self.handshake_timeout = handshake_timeout
        self._server_check = server_check
        self.server_identity: Any = None
        conn = SSL.Connection(context, None)
        conn.set_connect_state()
        conn.set_ciphertext_mtu(mtu)
        if certificate is not None:
            conn.use_certificate(certificate)
            conn.use_privatekey(private_key)
        if session is not None:
            conn.set_session(session)
        self._s = _Session(peer, conn, 0.0, 0.0)
        conn.set_app_data(self._s)
        self.closed_reason: str | None = None
        self._deadline: float | None = None

    @staticmethod
    def verify_callback(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
        """Install on the client Context: OpenSSL's chain check, then the engine's server check."""
        s = conn.get_app_data()
        if not ok:
            if isinstance(s, _Session):
                s.failure = f"server certificate refused: {_VERIFY_ERRORS.get(errno, f'X509 error {errno}')}"
            return False
        if not isinstance(s, _Session):
            return False
        s.chain.append(cert.to_cryptography())
        engine = s.identity      # before the handshake completes, `identity` holds the engine
        if depth == 0 and engine is not None and engine._server_check is not None:
            try:
                engine.server_identity = engine._server_check(s.chain[-1], list(reversed(s.chain[:-1])))
            except Exception as exc:
                s.failure = f"server certificate refused: {exc}"
                return False
        return True

    @property
    def established(self) -> bool:
        return self._s.state == ESTABLISHED

    @property
    def state(self) -> str:
        return self._s.state

    @property
    def cipher(self) -> str | None:
        return self._s.cipher

    @property
    def session(self) -> SSL.Session | None:
        """The TLS session, for resumption by a later ClientEngine."""
        return self._s.conn.get_session()

    def start(self, now: float) -> Output:
        self._s.identity = self
        self._s.started = now
        self._s.hs_deadline = now + self.handshake_timeout
        out = Output()
        self._drive(out, now)
        return out

    def receive(self, datagram: bytes, now: float) -> Output:
        out = Output()
        s = self._s
        if s.state == CLOSED:
            return out
        s.last_seen = now
        if s.rl is not None:
            self._receive_records(s, datagram, out)
            return out
        self._note_read_seqs(s, datagram)
        try:
            self._s.conn.bio_write(datagram)
        except SSL.Error:
            return out
        self._drive(out, now)
        return out

    def send(self, data: bytes, now: float) -> Output:
        s = self._s
        if s.state != ESTABLISHED:
            raise ConnectionError("DTLS session not established")
        if s.rl is not None:
            if len(data) > self.mtu - s.rl.overhead():
                raise ValueError(f"message of {len(data)} bytes exceeds the DTLS record payload limit")
            return Output([(self.peer, s.rl.seal(records.CT_APPLICATION_DATA, data))])
        if len(data) > s.conn.get_cleartext_mtu():
            raise ValueError(f"message of {len(data)} bytes exceeds the DTLS record payload limit")
        out = Output()
        s.conn.write(data)
        self._flush(s, out)
        return out

    def close(self, now: float) -> Output:
        out = Output()
        if self._s.state == CLOSED:
            return out
        if self._s.rl is not None:
            if self._s.state == ESTABLISHED:
                out.datagrams.append((self.peer, self._s.rl.seal(records.CT_ALERT, CLOSE_NOTIFY)))
        else:
            try:
                self._s.conn.shutdown()
            except SSL.Error:
                pass
            self._flush(self._s, out)
        self._end(self._s, out, "closed by client")
        return out

    def next_deadline(self) -> float | None:
        return self._deadline if self._s.state == HANDSHAKING else None

    def _schedule(self, now: float) -> None:
        s = self._s
        retransmit = s.conn.DTLSv1_get_timeout() if s.state == HANDSHAKING else None
        self._deadline = s.hs_deadline if retransmit is None else min(s.hs_deadline, now + retransmit)

    def handle_timeouts(self, now: float) -> Output:
        out = Output()
        s = self._s
        if s.state != HANDSHAKING:
            return out
        if now >= s.hs_deadline:
            self._end(s, out, "handshake timeout", emit=False)
            out.events.append(HandshakeFailed(self.peer, "handshake timeout"))
            return out
        try:
            s.conn.DTLSv1_handle_timeout()
        except SSL.Error as exc:
            self._end(s, out, _ssl_reason(exc), emit=False)
            out.events.append(HandshakeFailed(self.peer, _ssl_reason(exc)))
            return out
        s.last_seen = now
        self._flush(s, out)
        self._schedule(now)
        return out

    def _drive(self, out: Output, now: float) -> None:
        s = self._s
        if s.state == HANDSHAKING:
            try:
                s.conn.do_handshake()
            except SSL.WantReadError:
                self._flush(s, out)
                self._schedule(now)
                return
            except SSL.Error as exc:
                self._flush(s, out)
                reason = s.failure or _ssl_reason(exc)
                self._end(s, out, reason, emit=False)
                out.events.append(HandshakeFailed(self.peer, reason))
                return
            self._flush(s, out)
            s.state = ESTABLISHED
            s.cipher = s.conn.get_cipher_name()
            out.events.append(HandshakeComplete(self.peer, self.server_identity, bool(s.conn.get_session()
                                                and not s.chain), s.cipher))
            self._read_plaintext(s, out)
            self._flush(s, out)
            if self._takes_over and s.state == ESTABLISHED and RecordLayer.supports(s.cipher) and s.wseq >= 0:
                s.rl = self._record_layer(s, server=False)
            return
        self._read_plaintext(s, out)
        self._flush(s, out)

    def _receive_records(self, s: _Session, datagram: bytes, out: Output) -> None:
        """After the takeover: application data and alerts; anything else (a retransmitted
        handshake flight of the server) needs no answer from a client whose handshake is done."""
        for rec in records.split_records(datagram):
            if rec[3:5] != b"\x00\x01":
                continue
            opened = s.rl.open(rec)
            if opened is None:
                continue
            ctype, plaintext = opened
            if ctype == records.CT_APPLICATION_DATA:
                out.events.append(ApplicationData(self.peer, plaintext))
            elif ctype == records.CT_ALERT:
                self._end(s, out, "closed by peer" if plaintext == CLOSE_NOTIFY else
                          f"alert from peer: {plaintext.hex()}")
                return

    def _end(self, s: _Session, out: Output, reason: str, emit: bool = True) -> None:
        if s.state == ESTABLISHED and emit:
            out.events.append(SessionClosed(self.peer, reason))
        s.state = CLOSED
        self.closed_reason = reason
