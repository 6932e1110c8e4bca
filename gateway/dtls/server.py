"""The gateway's DTLS role: many peers on one engine, with cookies, caps and half-open bookkeeping,
on the session core (session.py).

In order of arrival of a datagram from an unknown address:
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
   handshake inside OpenSSL, which sends the peer an alert. With a `PskAuthenticator`, a client
   offering only TLS_PSK_WITH_AES_128_CCM_8 gets a PSK handshake instead (psk.py): its identity's
   key comes from the `PskAuthenticator`; a refused identity gets a random key nobody has, so it
   earns decrypt_error as a wrong key does (RFC 4279 section 2; the log has the real reason).
6. Timers: handshake timeout, idle timeout, and OpenSSL's retransmission timer.

A ClientHello from an address:port that has an established session (RFC 6347 4.2.8): one that
repeats the random of the handshake that made the session is a replay and gets no answer at
all. Any other goes through the cookie exchange (and 3. and 4.), then runs as a *pending*
handshake beside the session (a half-open handshake like any other): the session's own epoch-1
records still reach it, every record it cannot open goes to the pending handshake, and a
retransmission of the pending handshake's own ClientHello goes to it (OpenSSL answers it with
its flight again). Only when the pending handshake completes does it replace the session
(`SessionClosed(peer, "replaced by a new handshake")`, then `HandshakeComplete`); if it fails or
times out, the session is untouched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol

from cryptography import x509
from OpenSSL import SSL

from devid.gateway.dtls import records
from devid.gateway.dtls.alerts import KEEP, CertificateRefused, install_verify
from devid.gateway.dtls.cookies import Cookies, bind, hello_key
from devid.gateway.dtls.events import Output, Peer
from devid.gateway.dtls.limits import HandshakeRate, ServerLimits, address_key
from devid.gateway.dtls.psk import DECRYPT_ERROR, DUMMY_PSK_LEN, PskAuthenticator, PskRefused, alert_record, install_psk_server
from devid.gateway.dtls.errors import VERIFY_ERRORS, RemoteProtocolError
from devid.gateway.dtls.session import ESTABLISHED, HANDSHAKING, Engine, Session


class Authenticator(Protocol):
    def authenticate(self, leaf: x509.Certificate, intermediates: list[x509.Certificate]) -> Any:
        """Return the peer's identity, or raise `alerts.CertificateRefused` (its text is the
        refusal reason, its alert what the peer is sent); any other exception is an
        `internal_error`."""


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


class _Probe:
    """app_data of the connection during DTLSv1_listen (its cookie callback needs `bound`)."""
    __slots__ = ("peer", "bound")

    def __init__(self, peer: Peer, bound: bytes) -> None:
        self.peer = peer
        self.bound = bound


class ServerEngine(Engine):
    _is_server = True
    _takes_over = True          # every established session with a supported suite

    def __init__(self, context: SSL.Context, authenticator: Authenticator, limits: ServerLimits = ServerLimits(),
                 rand_bytes: Callable[[int], bytes] = os.urandom, psk: PskAuthenticator | None = None) -> None:
        """`context` must be a fresh DTLS server Context (see `contexts.server_context`); the engine
        installs its cookie and verify callbacks on it, and with `psk` its PSK callback (the
        Context must offer the PSK suite: `server_context(psk=True)`)."""
        super().__init__(limits.mtu, limits.idle_timeout)
        self.ctx = context
        self.authenticator = authenticator
        self.limits = limits
        self.stats = EngineStats()
        self.cookies = Cookies(limits.cookie_rotation, rand_bytes)
        self._half_open = 0
        self._half_open_by_address: dict[Hashable, int] = {}
        self._rate = HandshakeRate(limits.handshake_rate_per_address, limits.handshake_burst_per_address)
        self._by_device: dict[Any, list[Session]] = {}   # device key -> its established sessions, oldest first
        context.set_cookie_generate_callback(self._cookie_generate)
        context.set_cookie_verify_callback(self._cookie_verify)
        install_verify(context, SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        self.psk = psk
        if psk is not None:
            install_psk_server(context, self._psk)

    # -- cookies: OpenSSL checks them again in DTLSv1_listen and in the handshake ------------------

    def _cookie_generate(self, conn: SSL.Connection) -> bytes:
        return self.cookies.make(getattr(conn.get_app_data(), "bound", None) or b"")

    def _cookie_verify(self, conn: SSL.Connection, cookie: bytes) -> bool:
        bound = getattr(conn.get_app_data(), "bound", None)
        return bound is not None and self.cookies.check(cookie, bound)

    # -- certificate verification (inside the handshake) ----------------------------------------

    def _verify(self, conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> str | None:
        """None to accept; else the alert the peer is sent (alerts.py)."""
        s = conn.get_app_data()
        if not isinstance(s, Session):
            return "internal_error"
        if not ok:
            s.failure = f"certificate refused by OpenSSL: {VERIFY_ERRORS.get(errno, f'X509 error {errno}')}"
            return KEEP                 # OpenSSL's own error chooses the alert (unknown_ca, ...)
        # OpenSSL reports the chain from the trust anchor down to the leaf (depth 0). The anchor
        # (top) is one of the verifier's own anchors too, so only the certificates below it are
        # converted (each to_cryptography() is a DER round trip, ~65 us measured).
        s.chain.append(cert)
        if depth > 0:
            return None
        leaf = cert.to_cryptography()
        intermediates = [c.to_cryptography() for c in reversed(s.chain[1:-1])]
        try:
            s.identity = self.authenticator.authenticate(leaf, intermediates)
        except CertificateRefused as exc:
            s.failure = str(exc) or "certificate refused"
            return exc.alert
        except Exception as exc:      # an authenticator that could not decide (its registry failed)
            s.failure = str(exc) or exc.__class__.__name__
            return "internal_error"
        return None

    def _psk(self, conn: SSL.Connection, identity: bytes) -> bytes | None:
        """The PSK callback (inside the handshake): the identity's key, or None to refuse it."""
        s = conn.get_app_data()
        if not isinstance(s, Session):
            return None
        shown = identity[:64].decode("ascii", "replace")
        try:
            key, s.identity = self.psk.psk_for(identity)
        except PskRefused as exc:
            # RFC 4279 section 2: an unknown identity looks like a wrong key to the peer, so
            # alerts tell nobody which devices exist or are enrolled before it authenticates: a
            # random key nobody has, the handshake goes on and ends in decrypt_error at the
            # client's Finished (_to_openssl); the real reason is what is logged
            s.failure = f"PSK identity {shown!r} refused: {exc}"
            s.psk = identity
            return os.urandom(DUMMY_PSK_LEN)
        except Exception as exc:      # an authenticator that could not decide (its registry failed)
            s.failure = f"PSK identity {shown!r} not looked up: {exc.__class__.__name__}"
            return None
        s.psk = identity
        return key

    def _to_openssl(self, s: Session, datagram: bytes, out: Output) -> None:
        super()._to_openssl(s, datagram, out)
        # a PSK handshake given its key, still incomplete after the client's ChangeCipherSpec and
        # then its (epoch-1) Finished (in one datagram, or in two: tinydtls): OpenSSL could not
        # open the Finished, so the client's key is not the identity's (OpenSSL drops the record
        # without an alert: psk.py)
        if s.psk is None or s.state is not HANDSHAKING:
            return
        recs = records.split_records(datagram)
        if not s.psk_ccs:
            s.psk_ccs = any(r[0] == records.CT_CHANGE_CIPHER_SPEC and r[3:5] == b"\x00\x00" for r in recs)
        if s.psk_ccs and any(r[0] == records.CT_HANDSHAKE and r[3:5] == b"\x00\x01" for r in recs):
            out.datagrams.append((s.peer, alert_record(DECRYPT_ERROR, s.wseq0 + 1)))
            refused = s.identity is None and s.failure      # a dummy key (_psk): the lookup's refusal
            self._fail(s, out, refused or f"wrong key for PSK identity {s.psk[:64].decode('ascii', 'replace')!r}")

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
        if s.state is ESTABLISHED:
            if datagram[:1] == b"\x16" and records.is_client_hello(datagram):
                self._hello(peer, datagram, s, out)
                return out
            if s.pending is not None:
                self._receive_beside(s, datagram, out)
                return out
            s.last_seen = now
            if s.rl is not None:                 # the common case: an established session's records
                self._receive_records(s, datagram, out)
                self._schedule(s)
                return out
        self._receive(s, datagram, out)
        return out

    def send(self, peer: Peer, data: bytes, now: float) -> Output:
        """Encrypt one application message (one record). LocalProtocolError for a peer without an
        established session, or a message that would not fit the MTU (use CoAP block-wise transfer)."""
        self._now = now
        return self._send(self.sessions.get(peer), peer, data)

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

    # -- a ClientHello ---------------------------------------------------------------------------

    def _hello(self, peer: Peer, datagram: bytes, established: Session | None, out: Output) -> None:
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
        s = Session(peer, conn, self._now, self._now + self.limits.handshake_timeout)
        s.hello_random = hello.random
        s.bound = bound
        s.address = address
        s.network = network
        conn.set_app_data(s)
        if established is None:
            self.sessions[peer] = s
        else:                             # beside the session, which it replaces only once complete
            if established.pending is not None:     # its client gave up on it and started again
                self._fail(established.pending, out, "superseded by a newer handshake")
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

    def _receive_beside(self, s: Session, datagram: bytes, out: Output) -> None:
        """A datagram for a peer with an established session `s` and a handshake pending beside
        it: the session gets the records it can open, the pending handshake all others."""
        p = s.pending
        p.last_seen = self._now
        if s.rl is not None:
            rest: list[bytes] = []
            self._receive_records(s, datagram, out, rest)
            if s.state is ESTABLISHED:
                s.last_seen = self._now
                self._schedule(s)
            if rest and p.state is HANDSHAKING:
                self._to_openssl(p, b"".join(rest), out)
            return
        # OpenSSL still holds the session (a suite the record layer lacks): it drops epoch-1
        # records it cannot open, so those go to both; epoch 0 is the new handshake's alone
        epoch1 = b"".join(r for r in records.split_records(datagram) if r[3:5] == b"\x00\x01")
        if epoch1:
            s.last_seen = self._now
            self._to_openssl(s, epoch1, out)
        if p.state is HANDSHAKING:
            self._to_openssl(p, datagram, out)

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

    # -- the role's part of the session core ---------------------------------------------------

    def _authenticate(self, s: Session) -> tuple[Any, bool]:
        resumed = s.identity is None       # the verify and PSK callbacks do not run on resumption
        if resumed:
            try:
                leaf = s.conn.get_peer_certificate(as_cryptography=True)
                if leaf is None:
                    raise ValueError("no peer certificate in the resumed session")
                s.identity = self.authenticator.authenticate(leaf, [])
            except Exception as exc:
                try:
                    s.conn.shutdown()      # the handshake is complete: close_notify
                except SSL.Error:
                    pass
                raise RemoteProtocolError(f"resumed session refused: {exc}") from None
        return s.identity, resumed

    def _admit(self, s: Session, out: Output, resumed: bool) -> None:
        old = self.sessions.get(s.peer)
        if old is not s and old is not None:
            # it ran beside an established session: now complete, it replaces it (RFC 6347 4.2.8)
            old.pending = None
            self._end(old, out, "replaced by a new handshake")
            self.sessions[s.peer] = s
            self.stats.replaced += 1
        self._leave_half_open(s)
        s.bound = None
        self.stats.handshakes += 1
        self.stats.resumed += resumed

    def _admitted(self, s: Session, out: Output) -> None:
        self._count_device(s, out)

    def _on_failure(self, s: Session) -> None:
        self.stats.failed += 1

    def _forget(self, s: Session) -> None:
        if s.state is HANDSHAKING:
            self._leave_half_open(s)
        elif s.state is ESTABLISHED:
            key = self._device_key(s)
            mine = self._by_device.get(key) if key is not None else None
            if mine is not None:
                try:
                    mine.remove(s)
                except ValueError:
                    pass
                if not mine:
                    del self._by_device[key]

    # -- bookkeeping -----------------------------------------------------------------------------

    def _leave_half_open(self, s: Session) -> None:
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
    def _device_key(s: Session) -> Any:
        """What the session cap counts by: the device (its serial), so that its factory and
        operational certificates, and every certificate it was ever issued, share one budget;
        an identity without a serial counts by its certificate fingerprint."""
        serial = getattr(s.identity, "serial", None)
        if serial is not None:
            return ("device", serial)
        fingerprint = getattr(s.identity, "fingerprint", None)
        return ("certificate", fingerprint) if fingerprint is not None else None

    def _count_device(self, s: Session, out: Output) -> None:
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
