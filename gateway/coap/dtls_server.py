"""The gateway's coaps:// transport: the server DTLS engine on its UDP sockets, handing decoded
messages to the CoAP server core (`server.CoapServer`), which answers them; and the live
revocation watch that closes the sessions of identities the registry no longer serves.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Callable, Iterable

from aiocoap import Message
from OpenSSL import SSL

from devid.gateway.coap.dtls_interface import RCVBUF, DTLSInterface, DTLSRemote, hostinfo, log, log_event
from devid.gateway.dtls.errors import DTLSError
from devid.gateway.dtls.events import HandshakeComplete, HandshakeFailed, Output, SessionClosed
from devid.gateway.dtls.server import ServerEngine
from devid.gateway.system import metrics


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
                log.exception("error handling a datagram from %s", hostinfo(addr))

    def sendto(self, data: bytes, addr: tuple) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1               # a full send buffer: UDP may drop, the peer retransmits
        except OSError as exc:
            log.debug("cannot send to %s: %s", hostinfo(addr), exc)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class DTLSServerInterface(DTLSInterface):
    """coaps:// server: the gateway side. Never initiates sessions."""

    def __init__(self, mman, engine: ServerEngine, loop) -> None:
        super().__init__(mman, loop)
        self.engine = engine
        self.endpoints: list[_ServerSocket] = []
        self._by_peer_endpoint: dict[tuple, _ServerSocket] = {}
        self._revocation_task: asyncio.Task | None = None
        # set by the gateway (service/anomalies.py): the per-identity anomaly tracker, and the
        # wrapper of the engine's authenticator that names the device of a refused certificate
        self.anomalies = None
        self.witness = None

    @classmethod
    async def create(cls, mman, engine: ServerEngine, binds: Iterable[tuple[str, int]], loop,
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
        if self.witness is not None:
            self.witness.take()         # a refusal names its device only within this datagram
        out = self.engine.receive(addr, data, self._loop.time())
        self._process(out, endpoint)
        if addr not in self.engine.sessions:
            self._by_peer_endpoint.pop(addr, None)

    def _transmit(self, out: Output) -> None:
        for peer, datagram in out.datagrams:
            ep = self._by_peer_endpoint.get(peer)
            if ep is not None:
                ep.sendto(datagram, peer)

    def _engine_timeouts(self, now: float) -> Output:
        return self.engine.handle_timeouts(now)

    def _next_deadline(self) -> float | None:
        return self.engine.next_deadline()

    def _on_handshake(self, ev: HandshakeComplete) -> None:
        ident = ev.identity.as_dict() if hasattr(ev.identity, "as_dict") else {}
        log_event("handshake", result="ok", peer=hostinfo(ev.peer), resumed=ev.resumed, cipher=ev.cipher,
               **{k: ident.get(k) for k in ("serial", "device_type", "kind", "fingerprint")})
        metrics.HANDSHAKES.labels("ok").inc()
        metrics.SESSIONS.set(len(self.remotes))
        serial = getattr(ev.identity, "serial", None)
        if self.anomalies is not None and serial is not None:
            self.anomalies.seen(serial, ev.peer[0])

    def _on_handshake_failed(self, ev: HandshakeFailed) -> None:
        # the device a refused certificate named (its chain validated), when the refusal was the
        # authenticator's in this datagram
        serial = self.witness.take() if self.witness is not None else None
        log_event("handshake", result="refused", peer=hostinfo(ev.peer), reason=ev.reason, serial=serial)
        metrics.HANDSHAKES.labels("refused").inc()
        metrics.HANDSHAKE_REFUSALS.labels(metrics.refusal_class(ev.reason)).inc()
        if self.anomalies is not None and serial is not None:
            self.anomalies.refused(serial, "handshake")

    def _on_closed(self, ev: SessionClosed, remote: DTLSRemote | None) -> None:
        serial = getattr(remote.identity, "serial", None) if remote else None
        log_event("session-closed", peer=hostinfo(ev.peer), serial=serial, reason=ev.reason)
        metrics.SESSIONS.set(len(self.remotes))
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
        except (DTLSError, SSL.Error) as exc:     # LocalProtocolError: no session, too large
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
