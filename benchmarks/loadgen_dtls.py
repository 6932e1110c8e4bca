"""The load generator's transport: one device's DTLS 1.2 session on its own connected UDP socket
(the sans-I/O client engine of devid.gateway.dtls, no aiocoap Context), with CoAP on it, one CON
request at a time (piggybacked or separate responses, Block2 for large answers, retransmission
after ACK_TIMEOUT). `exchange` makes a session the transport of the device client's flows.

The only benchmarks module that imports the DTLS engine.
"""

from __future__ import annotations

import asyncio
import os
import socket
import warnings
from typing import Callable

from OpenSSL import SSL

from devid.gateway.device.protocol import EnrollFailed, Request
from devid.gateway.dtls import contexts
from devid.gateway.dtls.engine import (ApplicationData, ClientEngine, DTLSError, HandshakeComplete, HandshakeFailed,
                                      SessionClosed)
from loadgen_coap import ACK, CON, RST, Response, block2_option, decode_message, encode_message, encode_options

ACK_TIMEOUT = 2.0           # RFC 7252 4.8 (without the random factor: a load generator wants it plain)


def client_ssl_context(chain, anchors) -> SSL.Context:
    """A client Context with `chain` as extra chain certificates and `anchors` trusted; each
    connection brings its own certificate and key (one Context for many devices)."""
    return contexts.client_context(None, chain, None, anchors)


class Session:
    """One device's DTLS session on its own connected UDP socket, one CoAP request at a time."""

    __slots__ = ("loop", "sock", "engine", "timer", "ready", "pending", "mid", "tok", "closed", "refused")
    # of all sessions of this process: DTLS handshake timer expiries (retransmissions) and CoAP
    # request retransmissions; a sign of lost datagrams or of a gateway slower than the timers
    counters = {"dtls_timeouts": 0, "coap_retransmissions": 0}

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: tuple, family: int, ctx: SSL.Context,
                 device, trust, timeout: float) -> None:
        """`device`: its pyOpenSSL `x509` and `pkey`; `trust`: its `check_server`."""
        self.loop = loop
        # pyOpenSSL key and certificate objects converted once, before the run (converting from
        # cryptography objects costs ~0.1 ms per connection); pyOpenSSL calls that deprecated
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.engine = ClientEngine(ctx, peer, handshake_timeout=timeout, server_check=trust.check_server,
                                       certificate=device.x509, private_key=device.pkey, takeover=True)
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(peer)
        self.timer: asyncio.TimerHandle | None = None
        self.ready: asyncio.Future | None = None
        self.pending: _Exchange | None = None
        self.mid = int.from_bytes(os.urandom(2), "big")
        self.tok = 0
        self.closed: str | None = None
        self.refused: str | None = None       # the handshake's failure, as the engine gives it
        loop.add_reader(self.sock.fileno(), self._readable)

    # -- datagrams and events

    def _readable(self) -> None:
        recv, engine, loop = self.sock.recv, self.engine, self.loop
        while True:
            try:
                data = recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:            # ICMP port unreachable and the like
                self._fail(f"cannot reach the gateway: {exc.strerror or exc}")
                return
            self._process(engine.receive(data, loop.time()))
            if self.closed:
                return

    def _process(self, out) -> None:
        send = self.sock.send
        for _, datagram in out.datagrams:
            try:
                send(datagram)
            except (BlockingIOError, InterruptedError):
                pass                          # lost like any datagram: retransmission covers it
            except OSError as exc:
                self._fail(f"cannot reach the gateway: {exc.strerror or exc}")
                return
        for ev in out.events:
            if type(ev) is ApplicationData:
                self._coap(ev.data)
            elif type(ev) is HandshakeComplete:
                if self.ready is not None and not self.ready.done():
                    self.ready.set_result(None)
            elif type(ev) is HandshakeFailed:
                self.refused = ev.reason
                self._fail(f"the DTLS handshake failed ({ev.reason})")
            elif type(ev) is SessionClosed:
                self._fail(f"the gateway ended the DTLS session ({ev.reason})")
        if self.ready is not None and not self.ready.done():
            self._arm(self.engine.next_deadline())

    def _fail(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
        for fut in (self.ready, self.pending.future if self.pending else None):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(reason))

    def _arm(self, when: float | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None if when is None else self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        now = self.loop.time()
        if self.ready is not None and not self.ready.done():
            Session.counters["dtls_timeouts"] += 1
            self._process(self.engine.handle_timeouts(now))
            return
        ex = self.pending
        if ex is None or ex.future.done():
            return
        if now >= ex.deadline:
            ex.future.set_exception(TimeoutError())
            return
        if not ex.acked:                      # CON retransmission with exponential back-off
            Session.counters["coap_retransmissions"] += 1
            ex.interval *= 2
            self._send(ex.message)
        self._arm(min(ex.deadline, now + ex.interval) if not ex.acked else ex.deadline)

    def _send(self, message: bytes) -> None:
        try:
            self._process(self.engine.send(message, self.loop.time()))
        except DTLSError as exc:              # no established session (LocalProtocolError)
            self._fail(f"cannot send: {exc}")

    def _coap(self, data: bytes) -> None:
        try:
            m = decode_message(data)
        except ValueError:
            return
        ex = self.pending
        if m.mtype == CON:                     # a separate response (or anything else): ACK it
            self._send(encode_message(ACK, 0, m.mid, b"", b""))
        if ex is None or ex.future.done():
            return
        if m.mtype == RST and m.mid == ex.mid:
            ex.future.set_exception(ConnectionError("the gateway reset the request (RST)"))
        elif m.mtype == ACK and m.mid == ex.mid and m.code == 0:
            ex.acked = True                   # empty ACK: the response comes separately
            self._arm(ex.deadline)
        elif m.token == ex.token and m.code != 0 and (m.mtype != ACK or m.mid == ex.mid):
            ex.future.set_result(m)

    # -- the API

    @property
    def exporter(self) -> bytes | None:
        """The session's exporter value as this end computed it (`ClientEngine.exporter`): the
        session nonce of the one-request flow; None before the handshake or without the extended
        master secret."""
        return self.engine.exporter

    async def connect(self, timeout: float) -> None:
        self.ready = self.loop.create_future()
        self._process(self.engine.start(self.loop.time()))
        try:
            await self.ready
        finally:
            self._arm(None)
            self.ready = None

    async def request(self, code: int, options, payload: bytes, timeout: float) -> Response:
        """One CON request with `options` ((number, value) pairs, ascending); its response (payload
        of all Block2 blocks). Raises TimeoutError and ConnectionError."""
        body = b""
        block = None
        while True:
            opts = options if block is None else [*options, block2_option(*block)]
            r = await self._exchange(code, encode_options(opts), payload, timeout)
            if r.block2 is None:
                if body:
                    r.payload = body + r.payload
                return r
            num, more, szx = r.block2 >> 4, r.block2 >> 3 & 1, r.block2 & 7
            if num * (16 << szx) != len(body):
                raise ConnectionError(f"unexpected Block2 block {num} (have {len(body)} bytes)")
            body += r.payload
            if not more or r.code >> 5 != 2:
                r.payload = body
                return r
            block = (num + 1, szx)

    async def _exchange(self, code: int, options: bytes, payload: bytes, timeout: float) -> Response:
        if self.closed:
            raise ConnectionError(self.closed)
        self.mid = (self.mid + 1) & 0xFFFF
        self.tok = (self.tok + 1) & 0xFFFF
        token = self.tok.to_bytes(2, "big")
        message = encode_message(CON, code, self.mid, token, options, payload)
        now = self.loop.time()
        ex = self.pending = _Exchange(self.mid, token, message, self.loop.create_future(), now + timeout)
        self._send(message)
        self._arm(min(ex.deadline, now + ex.interval))
        try:
            return await ex.future
        finally:
            self._arm(None)
            self.pending = None

    def close(self) -> None:
        self._arm(None)
        try:
            self._process(self.engine.close(self.loop.time()))
        except Exception:
            pass
        self.closed = self.closed or "closed"
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class _Exchange:
    __slots__ = ("mid", "token", "message", "future", "deadline", "interval", "acked")

    def __init__(self, mid, token, message, future, deadline) -> None:
        self.mid, self.token, self.message, self.future, self.deadline = mid, token, message, future, deadline
        self.interval = ACK_TIMEOUT
        self.acked = False


async def connect(session: Session, timeout: float) -> Session:
    """The handshake; EnrollFailed at step `connect` (closing the session) if it fails."""
    try:
        await session.connect(timeout)
    except ConnectionError as exc:
        session.close()
        if session.refused is not None:
            raise EnrollFailed.handshake(session.refused) from None
        raise EnrollFailed("connect", str(exc)) from None
    return session


def exchange(session: Session, timeout: float) -> Callable:
    """The flows' transport over `session`: exchange(request) -> its Response."""
    async def send(request: Request) -> Response:
        ep = request.endpoint
        try:
            return await session.request(ep.method, ep.options, request.payload, timeout)
        except TimeoutError:
            raise EnrollFailed.no_answer(ep.step, timeout) from None
        except ConnectionError as exc:
            raise EnrollFailed(ep.step, str(exc)) from None
    return send
