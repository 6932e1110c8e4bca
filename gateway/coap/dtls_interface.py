"""What the server and client coaps:// transports share (`dtls_server.py`, `dtls_client.py`): the
aiocoap remote of one DTLS session, and an aiocoap MessageInterface that feeds the sans-I/O
DTLS engine's events to aiocoap's message manager and runs one loop timer for its deadlines.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiocoap import Message, error, interfaces
from aiocoap.numbers import EMPTY, RST

from devid.gateway.dtls.events import (ApplicationData, Event, HandshakeComplete, HandshakeFailed, Output,
                                       SessionClosed)

log = logging.getLogger("devid.dtls")
RCVBUF = 4 * 1024 * 1024       # bursts of close_notify or ClientHellos overflow the default buffer


def hostinfo(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def log_event(name: str, **fields: Any) -> None:
    """One `devid.dtls` event line (gateway/system/logs.py: None fields are left out)."""
    log.info(name, extra=fields)


class DTLSRemote(interfaces.EndpointAddress):
    """One DTLS session. Equality is identity: a new session from the same address is a new remote.

    `exporter` is the session's exporter value (dtls/exporter.py; None without the extended master
    secret), which the gateway accepts as the nonce of evidence made for this session, once and
    within the nonce lifetime: `exporter_at` is when the handshake completed (the loop's monotonic
    clock), `exporter_used` records the use (service/resources.py). A session lives in one
    process, on one event loop; requests of a session may run concurrently as tasks, so the use is
    claimed by the verifier with no `await` between its check and its mark."""

    scheme = "coaps"
    is_multicast = False
    is_multicast_locally = False

    def __init__(self, interface: "DTLSInterface", peer: tuple, identity: Any, local: tuple | None,
                 exporter: bytes | None = None) -> None:
        self._interface = interface
        self.peer = peer
        self.identity = identity
        self._local = local
        self.exporter = exporter
        self.exporter_at = asyncio.get_event_loop().time() if exporter is not None else None
        self.exporter_used = False

    @property
    def hostinfo(self) -> str:
        return hostinfo(self.peer)

    @property
    def hostinfo_local(self) -> str:
        if self._local is None:
            raise error.AnonymousHost("local address unknown")
        return hostinfo(self._local)

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


class DTLSInterface(interfaces.MessageInterface):
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

    def _process(self, out: Output, endpoint: Any = None) -> None:
        self._transmit(out)
        for ev in out.events:
            self._event(ev, endpoint)
        self._arm()

    def _event(self, ev: Event, endpoint: Any) -> None:
        if isinstance(ev, ApplicationData):
            remote = self.remotes.get(ev.peer)
            if remote is None or self._mman is None:
                return
            try:
                message = Message.decode(ev.data, remote=remote)
            except Exception:       # UnparsableMessage, or e.g. a Uri-Path that is not UTF-8
                log_event("unparsable", peer=hostinfo(ev.peer))
                self._unparsable(ev.data, remote)
                return
            self._mman.dispatch_message(message)
        elif isinstance(ev, HandshakeComplete):
            local = endpoint.local if endpoint is not None else None
            old = self.remotes.get(ev.peer)
            self.remotes[ev.peer] = DTLSRemote(self, ev.peer, ev.identity, local, ev.exporter)
            if old is not None and self._mman is not None:
                self._mman.dispatch_error(error.LibraryShutdown("DTLS session replaced"), old)
            self._on_handshake(ev)
        elif isinstance(ev, HandshakeFailed):
            self._on_handshake_failed(ev)
        elif isinstance(ev, SessionClosed):
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

    def _on_handshake(self, ev: HandshakeComplete) -> None: ...

    def _on_handshake_failed(self, ev: HandshakeFailed) -> None: ...

    def _on_closed(self, ev: SessionClosed, remote: DTLSRemote | None) -> None: ...

    async def recognize_remote(self, remote) -> bool:
        return isinstance(remote, DTLSRemote) and remote._interface is self and \
            self.remotes.get(remote.peer) is remote
