"""The DTLS session core that the server and client roles share (`server.py`, `client.py`).

Sans-I/O: every call takes the monotonic time `now` and returns an `events.Output`;
`next_deadline()` says when to call `handle_timeouts`. OpenSSL runs the handshake on memory BIOs
(its retransmission timer on its own clock). One session moves through `State`:

    HANDSHAKING --(handshake complete)--> ESTABLISHED --(close_notify, idle timeout, alert)--> CLOSED
         \\--(refused, timeout, superseded)------------------------------------------------->/

There is no CLOSING state: closing sends close_notify and forgets the session in the same call
(the peer's answering close_notify, if any, is not waited for; RFC 5246 7.2.1 allows it).

The core does what both roles do alike: feeding and draining OpenSSL, completing the handshake
(with the session's exporter value, exporter.py, carried on `HandshakeComplete`) and handing the
session to our record layer (recordlayer.py; the OpenSSL object is freed), the
records of an established session, close_notify, resending the final flight, closing, ending,
sending, timers. A role supplies the peer's identity (`_authenticate`) and its bookkeeping
(`_admit`, `_admitted`, `_forget`, `_on_failure`).

Errors (errors.py): a caller's misuse raises `LocalProtocolError`; a peer's fault is a
`RemoteProtocolError` that `_fail` turns into `HandshakeFailed` or `SessionClosed`.

Resending the final flight (RFC 6347 4.2.4): the party that sends the handshake's last flight
must send it again when the peer retransmits its previous one (our last flight was lost). While
OpenSSL holds the session it does this itself; once the record layer took over, the core keeps
the datagrams of the flight that completed the handshake (the server's ChangeCipherSpec and
Finished in a full handshake, the client's in a resumed one) and resends them, at most once a
second, until the peer's first application record shows it has them.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from typing import Any

from OpenSSL import SSL

from devid.gateway.dtls import records
from devid.gateway.dtls.events import ApplicationData, HandshakeComplete, HandshakeFailed, Output, Peer, SessionClosed
from devid.gateway.dtls.errors import LocalProtocolError, RemoteProtocolError, ssl_reason
from devid.gateway.dtls.exporter import exporter_value
from devid.gateway.dtls.recordlayer import RecordLayer

CLOSE_NOTIFY = b"\x01\x00"   # alert level warning, description close_notify
RESEND_INTERVAL = 1.0        # the final flight is resent at most this often


class State(enum.StrEnum):
    """Where a session stands (the diagram above)."""

    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    CLOSED = "closed"


# the states as module globals: one lookup each on the per-datagram paths
HANDSHAKING, ESTABLISHED, CLOSED = State.HANDSHAKING, State.ESTABLISHED, State.CLOSED


class Session:
    """One handshake or session with one peer."""

    __slots__ = ("peer", "conn", "state", "identity", "chain", "failure", "started", "last_seen",
                 "hs_deadline", "deadline", "cipher", "rl", "wseq", "rseqs", "last_flight", "resend_at",
                 "hello_random", "bound", "pending", "address", "network", "owner", "closed_reason",
                 "exporter", "psk", "psk_ccs", "wseq0")

    def __init__(self, peer: Peer, conn: SSL.Connection, now: float, hs_deadline: float) -> None:
        self.peer = peer
        self.conn: SSL.Connection | None = conn
        self.state = HANDSHAKING
        self.identity: Any = None
        self.chain: list[Any] = []            # during the handshake; server: OpenSSL X509, client: cryptography
        self.failure: str | None = None       # why a verify callback refused the peer's certificate
        self.started = now
        self.last_seen = now
        self.hs_deadline = hs_deadline
        self.deadline: float | None = None
        self.cipher: str | None = None
        # after the handshake: our own record layer replaces the OpenSSL object (recordlayer.py)
        self.rl: RecordLayer | None = None
        self.wseq = -1                       # highest epoch-1 sequence number OpenSSL sent
        self.rseqs: list[int] = []           # epoch-1 sequence numbers fed to OpenSSL
        self.last_flight: list[bytes] | None = None   # our final handshake flight, for resending
        self.resend_at = 0.0
        # server: the ClientHello's random (a replay repeats it), what its cookie was bound to
        # (until the handshake is done), and a handshake running beside this established session
        self.hello_random: bytes | None = None
        self.bound: bytes | None = None
        self.pending: Session | None = None
        self.address: Any = None             # server: what the per-address half-open cap counts it by
        self.network: Any = None             # server: its IPv6 network (None for IPv4), counted too
        self.owner: Any = None               # client: the engine, for the Context's verify callback
        self.closed_reason: str | None = None
        # the session's exporter value (exporter.py), computed when the handshake completes, before
        # the OpenSSL object is freed; None without the extended master secret
        self.exporter: bytes | None = None
        # server: the PSK identity whose key a PSK handshake was given (psk.py); the highest
        # epoch-0 sequence number OpenSSL sent (an alert of our own follows it)
        self.psk: bytes | None = None
        self.psk_ccs = False                 # and whether its client's ChangeCipherSpec came
        self.wseq0 = -1


class Engine:
    """The session core. A role sets `mtu`, `idle_timeout` (None: no idle timeout), `_takes_over`
    (move established sessions to the record layer) and `_is_server`, keeps its sessions in
    `sessions` (one per peer; the server may keep a second one `pending` beside it), and sets
    `_now` at the start of every call."""

    _is_server: bool
    _takes_over: bool

    def __init__(self, mtu: int, idle_timeout: float | None) -> None:
        self.mtu = mtu
        self.idle_timeout = idle_timeout
        self.sessions: dict[Peer, Session] = {}
        self._now = 0.0
        self._heap: list[tuple[float, int, Peer]] = []
        self._tiebreak = itertools.count()

    # -- what a role adds ------------------------------------------------------------------------

    def _authenticate(self, s: Session) -> tuple[Any, bool]:
        """(the peer's identity, whether the handshake resumed a session), once OpenSSL completed
        the handshake; raise RemoteProtocolError to refuse the peer after all."""
        raise NotImplementedError

    def _admit(self, s: Session, out: Output, resumed: bool) -> None:
        """Bookkeeping just before `s` becomes ESTABLISHED (and its HandshakeComplete)."""

    def _admitted(self, s: Session, out: Output) -> None:
        """Bookkeeping just after `s` became ESTABLISHED."""

    def _forget(self, s: Session) -> None:
        """Bookkeeping when `s` ends, while its state is still the one it ends in."""

    def _on_failure(self, s: Session) -> None:
        """A handshake failed."""

    # -- timers ----------------------------------------------------------------------------------

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
                self._timeout(s, out)
            if p is not None and p.deadline == when:
                self._timeout(p, out)
        return out

    def _timeout(self, s: Session, out: Output) -> None:
        s.deadline = None
        if s.state is HANDSHAKING:
            if self._now >= s.hs_deadline:
                self._fail(s, out, "handshake timeout")
                return
            try:
                s.conn.DTLSv1_handle_timeout()       # retransmits the last flight if due
            except SSL.Error as exc:
                self._fail(s, out, ssl_reason(exc))
                return
            self._flush(s, out)
        elif s.state is ESTABLISHED and self.idle_timeout is not None \
                and self._now >= s.last_seen + self.idle_timeout:
            self._close(s, out, "idle timeout")
            return
        self._schedule(s)

    def _schedule(self, s: Session) -> None:
        if s.state is HANDSHAKING:
            when = s.hs_deadline
            retransmit = s.conn.DTLSv1_get_timeout()
            if retransmit is not None:
                when = min(when, self._now + retransmit)
        elif s.state is ESTABLISHED and self.idle_timeout is not None:
            # rounded up to a step (1 s, or an eighth of a short idle timeout): the datagrams of a
            # busy session then leave its deadline, and the timer heap, alone
            step = min(1.0, self.idle_timeout / 8)
            exact = s.last_seen + self.idle_timeout
            when = max(exact, math.ceil(exact / step) * step)      # never before it, despite rounding
        elif s.state is CLOSED:
            return
        else:
            when = None
        if s.deadline != when:
            s.deadline = when
            if when is not None:
                heapq.heappush(self._heap, (when, next(self._tiebreak), s.peer))

    # -- receiving ---------------------------------------------------------------------------------

    def _receive(self, s: Session, datagram: bytes, out: Output) -> None:
        """A datagram for one session (handshaking or established)."""
        s.last_seen = self._now
        if s.rl is not None:                 # the common case: an established session's records
            self._receive_records(s, datagram, out)
            self._schedule(s)
        else:
            self._to_openssl(s, datagram, out)

    def _to_openssl(self, s: Session, datagram: bytes, out: Output) -> None:
        if self._takes_over and s.state is HANDSHAKING:
            # epoch-1 records OpenSSL reads during the handshake (the peer's Finished): the record
            # layer's replay window must start with them
            s.rseqs.extend(int.from_bytes(r[5:11], "big") for r in records.split_records(datagram)
                           if r[3:5] == b"\x00\x01")
        try:
            s.conn.bio_write(datagram)
        except SSL.Error:
            return
        self._drive(s, out)

    def _drive(self, s: Session, out: Output) -> None:
        """Let OpenSSL act on what it was given: a handshake step, or plaintext to read."""
        try:
            if s.state is HANDSHAKING:
                self._handshake(s, out)
            else:
                self._read_plaintext(s, out)
                self._flush(s, out)
        except RemoteProtocolError as exc:
            self._fail(s, out, str(exc))
            return
        self._schedule(s)

    def _handshake(self, s: Session, out: Output) -> None:
        first = len(out.datagrams)
        try:
            s.conn.do_handshake()
        except SSL.WantReadError:
            self._flush(s, out)
            return
        except SSL.Error as exc:
            raise RemoteProtocolError(s.failure or ssl_reason(exc)) from None
        self._flush(s, out)
        identity, resumed = self._authenticate(s)
        self._admit(s, out, resumed)
        s.state = ESTABLISHED
        s.identity = identity
        s.cipher = s.conn.get_cipher_name()
        s.exporter = exporter_value(s.conn)
        s.chain = []                       # only needed during the handshake
        out.events.append(HandshakeComplete(s.peer, identity, resumed, s.cipher, s.exporter))
        self._admitted(s, out)
        self._read_plaintext(s, out)
        self._flush(s, out)
        if self._takes_over and s.state is ESTABLISHED:
            self._take_over(s, [dg for p, dg in out.datagrams[first:] if p == s.peer])

    def _take_over(self, s: Session, final_flight: list[bytes]) -> None:
        """Replace the OpenSSL object of an established session by our record layer, continuing
        OpenSSL's sequence numbers; keep the flight that completed the handshake, if we sent one."""
        if not RecordLayer.supports(s.cipher) or s.wseq < 0:
            return
        conn = s.conn
        rl = RecordLayer(s.cipher, conn.master_key(), conn.client_random(), conn.server_random(),
                         server=self._is_server, write_seq=s.wseq + 1)
        for seq in s.rseqs:
            rl.mark(seq)
        s.rseqs = []
        s.rl = rl
        s.last_flight = final_flight or None
        conn.set_app_data(None)
        s.conn = None

    def _read_plaintext(self, s: Session, out: Output) -> None:
        while s.state is ESTABLISHED:
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
                raise RemoteProtocolError(f"DTLS error: {ssl_reason(exc)}") from None
            out.events.append(ApplicationData(s.peer, data))

    def _receive_records(self, s: Session, datagram: bytes, out: Output, rest: list[bytes] | None = None) -> None:
        """The records of an established session on our record layer. With `rest` (a handshake
        is pending beside the session), epoch-0 records and those the session cannot open are
        put there instead of being dropped."""
        rl = s.rl
        for rec in records.split_records(datagram):
            if rec[3:5] != b"\x00\x01":
                if rest is not None:
                    rest.append(rec)
                # epoch 0 after the handshake: the peer is retransmitting its last flight because
                # ours was lost
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
                    self._fail(s, out, f"alert from peer: {plaintext.hex()}")
                return
            elif ctype == records.CT_HANDSHAKE:
                self._resend_final_flight(s, out)     # a retransmitted Finished

    def _resend_final_flight(self, s: Session, out: Output) -> None:
        if s.last_flight and self._now >= s.resend_at:
            s.resend_at = self._now + RESEND_INTERVAL
            out.datagrams.extend((s.peer, dg) for dg in s.last_flight)

    # -- sending -----------------------------------------------------------------------------------

    def _flush(self, s: Session, out: Output) -> None:
        """What OpenSSL wrote, cut into datagrams of at most `mtu` bytes."""
        if s.conn is None:
            return
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
            if self._takes_over and s.state is HANDSHAKING:    # follow OpenSSL's epoch-1 write sequence
                for _, dg in out.datagrams[first:]:
                    for r in records.split_records(dg):
                        if r[3:5] == b"\x00\x01":
                            s.wseq = max(s.wseq, int.from_bytes(r[5:11], "big"))
                        else:
                            s.wseq0 = max(s.wseq0, int.from_bytes(r[5:11], "big"))

    def _send(self, s: Session | None, peer: Peer, data: bytes) -> Output:
        """One application message in one record. LocalProtocolError for a peer without an
        established session, or a message that would not fit the MTU (use CoAP block-wise)."""
        if s is None or s.state is not ESTABLISHED:
            raise LocalProtocolError(f"no established DTLS session with {peer!r}")
        limit = self.mtu - s.rl.overhead() if s.rl is not None else s.conn.get_cleartext_mtu()
        if len(data) > limit:
            raise LocalProtocolError(f"message of {len(data)} bytes exceeds the DTLS record payload limit {limit}")
        out = Output()
        s.last_seen = self._now
        if s.rl is not None:
            out.datagrams.append((s.peer, s.rl.seal(records.CT_APPLICATION_DATA, data)))
        else:
            s.conn.write(data)
            self._flush(s, out)
        self._schedule(s)
        return out

    # -- ending ------------------------------------------------------------------------------------

    def _close(self, s: Session, out: Output, reason: str) -> None:
        """close_notify (or OpenSSL's shutdown) for one session or handshake, then forget it."""
        if s.rl is not None:
            if s.state is ESTABLISHED:
                out.datagrams.append((s.peer, s.rl.seal(records.CT_ALERT, CLOSE_NOTIFY)))
        elif s.conn is not None:
            try:
                s.conn.shutdown()
            except SSL.Error:
                pass
            self._flush(s, out)
        self._end(s, out, reason)

    def _fail(self, s: Session, out: Output, reason: str) -> None:
        """The one place a peer's fault (a RemoteProtocolError, a timeout) ends a session: a
        handshake fails (HandshakeFailed), an established session closes (SessionClosed)."""
        self._flush(s, out)        # the alert OpenSSL queued
        if s.state is HANDSHAKING:
            self._on_failure(s)
            out.events.append(HandshakeFailed(s.peer, reason))
            self._end(s, out, reason, emit=False)
        else:
            self._end(s, out, reason)

    def _end(self, s: Session, out: Output, reason: str, emit: bool = True) -> None:
        if s.state is CLOSED:
            return
        self._forget(s)
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
        if s.state is ESTABLISHED and emit:
            out.events.append(SessionClosed(peer, reason))
        s.state = CLOSED
        s.closed_reason = reason
        s.deadline = None
        if s.conn is not None:
            s.conn.set_app_data(None)
