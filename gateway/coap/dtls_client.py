"""The device's coaps:// transport: one client DTLS engine per server address, each on its own
connected UDP socket, under an aiocoap Context (`client_context`).
"""

from __future__ import annotations

import asyncio
import socket

from aiocoap import GET, Context, Message, error
from aiocoap.numbers import COAPS_PORT
from aiocoap.util import hostportsplit
from OpenSSL import SSL

from devid.gateway.coap.dtls_interface import RCVBUF, DTLSInterface, DTLSRemote, log
from devid.gateway.dtls.client import ClientEngine
from devid.gateway.dtls.events import HandshakeComplete, HandshakeFailed, Output, SessionClosed


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, owner: "DTLSClientInterface") -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        except OSError:
            pass

    @property
    def local(self) -> tuple | None:
        return self.transport.get_extra_info("sockname")[:2] if self.transport is not None else None

    def datagram_received(self, data: bytes, addr) -> None:
        self.owner._datagram(self, data, addr[:2])

    def error_received(self, exc) -> None:
        log.debug("socket error: %s", exc)


class _ClientSession:
    def __init__(self, engine: ClientEngine, endpoint: _Endpoint) -> None:
        self.engine = engine
        self.endpoint = endpoint
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()


class DTLSClientInterface(DTLSInterface):
    """coaps:// client: the device side. One DTLS session per server address."""

    def __init__(self, mman, ssl_context: SSL.Context, loop, *, server_check=None, mtu: int = 1280,
                 handshake_timeout: float = 30.0) -> None:
        super().__init__(mman, loop)
        self.ssl_context = ssl_context
        self.server_check = server_check
        self.mtu = mtu
        self.handshake_timeout = handshake_timeout
        self.sessions: dict[tuple, _ClientSession] = {}
        self.tls_sessions: dict[tuple, SSL.Session] = {}      # for resumption

    async def _connect(self, host: str, port: int) -> DTLSRemote:
        try:
            infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise error.ResolutionError(f"cannot resolve {host}: {exc.strerror}") from None
        if not infos:
            raise error.ResolutionError(f"cannot resolve {host}")
        family, _, _, _, sockaddr = infos[0]
        peer = sockaddr[:2]
        existing = self.sessions.get(peer)
        if existing is not None:
            await asyncio.shield(existing.ready)
            remote = self.remotes.get(peer)
            if remote is not None:
                return remote
        _, endpoint = await self._loop.create_datagram_endpoint(lambda: _Endpoint(self), remote_addr=peer,
                                                                family=family)
        eng = ClientEngine(self.ssl_context, peer, mtu=self.mtu, handshake_timeout=self.handshake_timeout,
                             session=self.tls_sessions.get(peer), server_check=self.server_check)
        session = _ClientSession(eng, endpoint)
        self.sessions[peer] = session
        self._process(eng.start(self._loop.time()), endpoint)
        try:
            await session.ready
        except BaseException:
            self._drop(peer)
            raise
        return self.remotes[peer]

    def _drop(self, peer: tuple) -> None:
        session = self.sessions.pop(peer, None)
        if session is not None and session.endpoint.transport is not None:
            session.endpoint.transport.close()

    def _datagram(self, endpoint: _Endpoint, data: bytes, addr: tuple) -> None:
        for peer, session in self.sessions.items():
            if session.endpoint is endpoint:
                self._process(session.engine.receive(data, self._loop.time()), endpoint)
                return

    def _transmit(self, out: Output) -> None:
        for peer, datagram in out.datagrams:
            session = self.sessions.get(peer)
            if session is not None and session.endpoint.transport is not None:
                session.endpoint.transport.sendto(datagram)

    def _engine_timeouts(self, now: float) -> Output:
        out = Output()
        for session in list(self.sessions.values()):
            deadline = session.engine.next_deadline()
            if deadline is not None and deadline <= now:
                out.extend(session.engine.handle_timeouts(now))
        return out

    def _next_deadline(self) -> float | None:
        deadlines = [d for d in (s.engine.next_deadline() for s in self.sessions.values()) if d is not None]
        return min(deadlines) if deadlines else None

    def _on_handshake(self, ev: HandshakeComplete) -> None:
        session = self.sessions.get(ev.peer)
        if session is not None:
            self.tls_sessions[ev.peer] = session.engine.session
            if not session.ready.done():
                session.ready.set_result(True)

    def _on_handshake_failed(self, ev: HandshakeFailed) -> None:
        session = self.sessions.get(ev.peer)
        if session is not None and not session.ready.done():
            session.ready.set_exception(DTLSHandshakeError(ev.reason))
        self._drop(ev.peer)

    def _on_closed(self, ev: SessionClosed, remote) -> None:
        self._drop(ev.peer)

    def send(self, message: Message) -> None:
        remote = message.remote
        session = self.sessions.get(getattr(remote, "peer", None))
        if session is None or not session.engine.established:
            log.debug("not sending to %r: no session", remote)
            return
        self._process(session.engine.send(message.encode(), self._loop.time()))

    async def determine_remote(self, request):
        if request.requested_scheme != "coaps":
            return None
        if self._mman is None:
            raise error.LibraryShutdown()
        if request.unresolved_remote is not None:
            host, port = hostportsplit(request.unresolved_remote)
        elif request.opt.uri_host:
            host, port = request.opt.uri_host, request.opt.uri_port
        else:
            raise ValueError("no host to send the request to")
        return await self._connect(host, port or COAPS_PORT)

    async def close_sessions(self) -> None:
        now = self._loop.time()
        for peer, session in list(self.sessions.items()):
            self._process(session.engine.close(now))
            self._drop(peer)

    async def shutdown(self) -> None:
        self._mman = None          # aiocoap has already shut the message manager down
        await self.close_sessions()
        if self._timer is not None:
            self._timer.cancel()


class DTLSHandshakeError(error.NetworkError):
    """The DTLS handshake with the server failed (the reason is the message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "DTLS handshake failed"


async def client_context(ssl_context: SSL.Context, *, server_check=None, mtu: int = 1280,
                         handshake_timeout: float = 30.0,
                         loggername: str = "devid.coap-client") -> tuple[Context, DTLSClientInterface]:
    """An aiocoap client Context that speaks coaps:// with the given device credentials."""
    loop = asyncio.get_running_loop()
    ctx = Context(loop=loop, serversite=None, loggername=loggername)
    holder: list[DTLSClientInterface] = []

    async def make(mman):
        iface = DTLSClientInterface(mman, ssl_context, loop, server_check=server_check, mtu=mtu,
                                    handshake_timeout=handshake_timeout)
        holder.append(iface)
        return iface

    await ctx._append_tokenmanaged_messagemanaged_transport(make)
    return ctx, holder[0]


async def handshake(iface: DTLSClientInterface, base_uri: str) -> None:
    """The DTLS handshake with the server of `base_uri` (coaps://host:port) now, before any request:
    the session the requests to that server then use. Raises DTLSHandshakeError (refused),
    aiocoap's ResolutionError (a name that does not resolve) or OSError (no route); no timeout of
    its own (the caller's). aiocoap's `determine_remote` is the transport's way in, kept here."""
    await iface.determine_remote(Message(code=GET, uri=f"{base_uri}/"))
