"""The DTLS engine on asyncio UDP sockets, as an aiocoap message transport (coaps://).

The client side runs under an aiocoap Context; the gateway side hands decoded messages to
`gateway.coap.CoapServer`, which answers them (it offers the two calls of aiocoap's message
manager the interface makes: `dispatch_message`, `dispatch_error`).

aiocoap has no plug-in registry for transports: a Context gets this one the way it gets its
built-in ones (`Context._append_tokenmanaged_messagemanaged_transport`), which is why aiocoap is
pinned to the version this was built against (0.4.17). One `DTLSRemote` exists per DTLS session;
its `authenticated_claims` carry the peer identity the engine's authenticator returned.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Any, Callable, Iterable

from aiocoap import Context, Message, error, interfaces
from aiocoap.numbers import EMPTY, RST
from aiocoap.numbers import COAPS_PORT
from aiocoap.util import hostportsplit
from OpenSSL import SSL

from devid.gateway.dtls import engine as E

log = logging.getLogger("devid.dtls")
RCVBUF = 4 * 1024 * 1024       # bursts of close_notify or ClientHellos overflow the default buffer


def _hostinfo(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _event(name: str, **fields: Any) -> None:
    """One `devid.dtls` event line (gateway/system/logs.py: None fields are left out)."""
    log.info(name, extra=fields)


class DTLSRemote(interfaces.EndpointAddress):
    """One DTLS session. Equality is identity: a new session from the same address is a new remote."""

    scheme = "coaps"
    is_multicast = False
    is_multicast_locally = False

    def __init__(self, interface: "_DTLSInterface", peer: tuple, identity: Any, local: tuple | None) -> None:
        self._interface = interface
        self.peer = peer
        self.identity = identity
        self._local = local

    @property
    def hostinfo(self) -> str:
        return _hostinfo(self.peer)

    @property
    def hostinfo_local(self) -> str:
        if self._local is None:
            raise error.AnonymousHost("local address unknown")
        return _hostinfo(self._local)

    @property
    def uri_base(self) -> str:
        return "coaps://" + self.hostinfo

    @property
    def uri_base_local(self) -> str:
        return "coaps://" + self.hostinfo_local

    @property
    def authenticated_claims(self):
        return (self.identity,) if self.identity is not None else ()

    @property
    def blockwise_key(self):
        return self

    def __repr__(self) -> str:
        who = getattr(self.identity, "serial", None)
        return f"<DTLSRemote {self.hostinfo}{' ' + who if who else ''}>"


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, owner: "_DTLSInterface") -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        except OSError:
            pass

    def datagram_received(self, data: bytes, addr) -> None:
        self.owner._datagram(self, data, addr[:2])

    def error_received(self, exc) -> None:
        log.debug("socket error: %s", exc)


class _ServerSocket:
    """A server UDP socket read straight from the event loop: every queued datagram (up to
    READ_BATCH) per readiness event, sent with a plain sendto. asyncio's datagram transport reads
    one datagram per loop iteration and wraps each send; under load that was ~12 % of the
    gateway's CPU (py-spy, `devid bench`)."""

    READ_BATCH = 64

    def __init__(self, owner: "DTLSServerInterface", sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.sock = sock
        self.loop = loop
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        except OSError:
            pass
        self.local = sock.getsockname()[:2]
        self.dropped = 0
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        recv = self.sock.recvfrom
        for _ in range(self.READ_BATCH):
            try:
                data, addr = recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:          # e.g. an ICMP error queued on the socket
                log.debug("socket error: %s", exc)
                continue
            try:
                self.owner._datagram(self, data, addr[:2])
            except Exception:               # one bad datagram must not stop the others
                log.exception("error handling a datagram from %s", _hostinfo(addr))

    def sendto(self, data: bytes, addr: tuple) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1               # a full send buffer: UDP may drop, the peer retransmits
        except OSError as exc:
            log.debug("cannot send to %s: %s", _hostinfo(addr), exc)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class _DTLSInterface(interfaces.MessageInterface):
    """What server and client transports share: event handling and timers."""

    def __init__(self, mman: interfaces.MessageManager, loop: asyncio.AbstractEventLoop) -> None:
        self._mman: interfaces.MessageManager | None = mman
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.remotes: dict[tuple, DTLSRemote] = {}

    # subclasses: _transmit(out), _engine_timeouts(now), _next_deadline()

    TIMER_SLACK = 0.01      # a timer due this much after the current one reuses it

    def _arm(self) -> None:
        """One loop timer for the engine's earliest deadline. A timer already set to fire earlier
        (or at most TIMER_SLACK later) is kept: firing early only re-arms, and re-arming on every
        datagram was ~4 % of the gateway's CPU under load."""
        when = self._next_deadline()
        if when == self._timer_at or (when is not None and self._timer_at is not None
                                      and self._timer_at <= when + self.TIMER_SLACK):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = None if when is None else self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._process(self._engine_timeouts(self._loop.time()))

    def _process(self, out: E.Output, endpoint: _Endpoint | None = None) -> None:
        self._transmit(out)
        for ev in out.events:
            self._event(ev, endpoint)
        self._arm()

    def _event(self, ev: E.Event, endpoint: _Endpoint | None) -> None:
        if isinstance(ev, E.ApplicationData):
            remote = self.remotes.get(ev.peer)
            if remote is None or self._mman is None:
                return
            try:
                message = Message.decode(ev.data, remote=remote)
            except Exception:       # UnparsableMessage, or e.g. a Uri-Path that is not UTF-8
                _event("unparsable", peer=_hostinfo(ev.peer))
                self._unparsable(ev.data, remote)
                return
            self._mman.dispatch_message(message)
        elif isinstance(ev, E.HandshakeComplete):
            local = None
            if isinstance(endpoint, _ServerSocket):
                local = endpoint.local
            elif endpoint is not None and endpoint.transport is not None:
                local = endpoint.transport.get_extra_info("sockname")[:2]
            old = self.remotes.get(ev.peer)
            self.remotes[ev.peer] = DTLSRemote(self, ev.peer, ev.identity, local)
            if old is not None and self._mman is not None:
                self._mman.dispatch_error(error.LibraryShutdown("DTLS session replaced"), old)
            self._on_handshake(ev)
        elif isinstance(ev, E.HandshakeFailed):
            self._on_handshake_failed(ev)
        elif isinstance(ev, E.SessionClosed):
            remote = self.remotes.pop(ev.peer, None)
            self._on_closed(ev, remote)
            if remote is not None and self._mman is not None:
                self._mman.dispatch_error(error.RemoteServerShutdown(f"DTLS session ended: {ev.reason}"), remote)

    def _unparsable(self, data: bytes, remote: DTLSRemote) -> None:
        """A CON that cannot be parsed is rejected with a Reset (RFC 7252 4.2), if its header can."""
        if len(data) >= 4 and data[0] >> 6 == 1 and (data[0] >> 4) & 3 == 0 and self._mman is not None:
            rst = Message(code=EMPTY)
            rst.mtype, rst.mid, rst.remote = RST, int.from_bytes(data[2:4], "big"), remote
            self.send(rst)

    def _on_handshake(self, ev: E.HandshakeComplete) -> None: ...

    def _on_handshake_failed(self, ev: E.HandshakeFailed) -> None: ...

    def _on_closed(self, ev: E.SessionClosed, remote: DTLSRemote | None) -> None: ...

    async def recognize_remote(self, remote) -> bool:
        return isinstance(remote, DTLSRemote) and remote._interface is self and \
            self.remotes.get(remote.peer) is remote


class DTLSServerInterface(_DTLSInterface):
    """coaps:// server: the gateway side. Never initiates sessions."""

    def __init__(self, mman, engine: E.ServerEngine, loop) -> None:
        super().__init__(mman, loop)
        self.engine = engine
        self.endpoints: list[_ServerSocket] = []
        self._by_peer_endpoint: dict[tuple, _ServerSocket] = {}
        self._revocation_task: asyncio.Task | None = None

    @classmethod
    async def create(cls, mman, engine: E.ServerEngine, binds: Iterable[tuple[str, int]], loop,
                     reuse_port: bool = False) -> "DTLSServerInterface":
        self = cls(mman, engine, loop)
        for host, port in binds:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if reuse_port:      # workers of one gateway; never SO_REUSEADDR (two gateways on one port)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            self.endpoints.append(_ServerSocket(self, sock, loop))
        return self

    @property
    def addresses(self) -> list[tuple]:
        return [ep.local for ep in self.endpoints]

    def _datagram(self, endpoint: _ServerSocket, data: bytes, addr: tuple) -> None:
        self._by_peer_endpoint[addr] = endpoint
        out = self.engine.receive(addr, data, self._loop.time())
        self._process(out, endpoint)
        if addr not in self.engine.sessions:
            self._by_peer_endpoint.pop(addr, None)

    def _transmit(self, out: E.Output) -> None:
        for peer, datagram in out.datagrams:
            ep = self._by_peer_endpoint.get(peer)
            if ep is not None:
                ep.sendto(datagram, peer)

    def _engine_timeouts(self, now: float) -> E.Output:
        return self.engine.handle_timeouts(now)

    def _next_deadline(self) -> float | None:
        return self.engine.next_deadline()

    def _on_handshake(self, ev: E.HandshakeComplete) -> None:
        ident = ev.identity.as_dict() if hasattr(ev.identity, "as_dict") else {}
        _event("handshake", result="ok", peer=_hostinfo(ev.peer), resumed=ev.resumed, cipher=ev.cipher,
               **{k: ident.get(k) for k in ("serial", "device_type", "kind", "fingerprint")})

    def _on_handshake_failed(self, ev: E.HandshakeFailed) -> None:
        _event("handshake", result="refused", peer=_hostinfo(ev.peer), reason=ev.reason)

    def _on_closed(self, ev: E.SessionClosed, remote: DTLSRemote | None) -> None:
        serial = getattr(remote.identity, "serial", None) if remote else None
        _event("session-closed", peer=_hostinfo(ev.peer), serial=serial, reason=ev.reason)
        if ev.peer not in self.engine.sessions:    # a session replaced by a new handshake keeps its socket
            self._by_peer_endpoint.pop(ev.peer, None)

    # -- live revocation -------------------------------------------------------------------------

    def start_revocation_watch(self, ended: Callable[[list], list], interval: float) -> None:
        """Every `interval` seconds, ask the registry which live sessions' identities may no longer
        be served (`ended` returns (identity, reason) pairs), and close those sessions."""
        async def watch() -> None:
            while True:
                await asyncio.sleep(interval)
                by_identity = {id(r.identity): peer for peer, r in self.remotes.items() if r.identity is not None}
                identities = [r.identity for r in self.remotes.values() if r.identity is not None]
                try:
                    gone = ended(identities)
                except Exception as exc:          # a locked or broken registry must not stop the gateway
                    log.warning("revocation check failed: %s", exc)
                    continue
                for identity, reason in gone:
                    peer = by_identity.get(id(identity))
                    if peer is not None:
                        self._process(self.engine.close(peer, self._loop.time(), reason))
        self._revocation_task = self._loop.create_task(watch())

    # -- MessageInterface ----------------------------------------------------------------------

    def send(self, message: Message) -> None:
        remote = message.remote
        if self._mman is None or not isinstance(remote, DTLSRemote) or self.remotes.get(remote.peer) is not remote:
            log.debug("not sending to %r: no session", remote)
            return
        try:
            out = self.engine.send(remote.peer, message.encode(), self._loop.time())
        except (KeyError, ValueError, SSL.Error) as exc:
            log.warning("cannot send to %s: %s", remote.hostinfo, exc)
            return
        self._process(out)

    async def determine_remote(self, request):
        return None          # the gateway never opens sessions; it only answers on existing ones

    async def shutdown(self) -> None:
        if self._revocation_task is not None:
            self._revocation_task.cancel()
        self._mman = None          # the CoAP server core is shutting down
        now = self._loop.time()
        for peer in list(self.engine.sessions):
            self._process(self.engine.close(peer, now, "gateway shutting down"))
        if self._timer is not None:
            self._timer.cancel()
        for ep in self.endpoints:
            ep.close()


class _ClientSession:
    def __init__(self, engine: E.ClientEngine, endpoint: _Endpoint) -> None:
        self.engine = engine
        self.endpoint = endpoint
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()


class DTLSClientInterface(_DTLSInterface):
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
        eng = E.ClientEngine(self.ssl_context, peer, mtu=self.mtu, handshake_timeout=self.handshake_timeout,
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

    def _transmit(self, out: E.Output) -> None:
        for peer, datagram in out.datagrams:
            session = self.sessions.get(peer)
            if session is not None and session.endpoint.transport is not None:
                session.endpoint.transport.sendto(datagram)

    def _engine_timeouts(self, now: float) -> E.Output:
        out = E.Output()
        for session in list(self.sessions.values()):
            deadline = session.engine.next_deadline()
            if deadline is not None and deadline <= now:
                out.extend(session.engine.handle_timeouts(now))
        return out

    def _next_deadline(self) -> float | None:
        deadlines = [d for d in (s.engine.next_deadline() for s in self.sessions.values()) if d is not None]
        return min(deadlines) if deadlines else None

    def _on_handshake(self, ev: E.HandshakeComplete) -> None:
        session = self.sessions.get(ev.peer)
        if session is not None:
            self.tls_sessions[ev.peer] = session.engine.session
            if not session.ready.done():
                session.ready.set_result(True)

    def _on_handshake_failed(self, ev: E.HandshakeFailed) -> None:
        session = self.sessions.get(ev.peer)
        if session is not None and not session.ready.done():
            session.ready.set_exception(DTLSHandshakeError(ev.reason))
        self._drop(ev.peer)

    def _on_closed(self, ev: E.SessionClosed, remote) -> None:
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


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT', '[V6]:PORT', ':PORT', 'HOST' or a bare IPv6 address -> (host, port); port 0
    picks a free port. Raises ValueError."""
    try:
        ipaddress.ip_address(text)
        return text, COAPS_PORT                       # a bare address, IPv6 included
    except ValueError:
        pass
    if text.startswith(":"):
        host, port = "", text[1:]
    else:
        host, port = hostportsplit(text)
    port = COAPS_PORT if port in (None, "") else int(port)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    host = host or "0.0.0.0"
    ipaddress.ip_address(host)
    return host, port
