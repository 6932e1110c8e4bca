"""Building blocks for DTLS tests: contexts from a real data directory, a fake lossy network."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from devid.ca import keys
from devid.gateway.app.datadir import DataDir
from devid.gateway.dtls import contexts, engine as E, records
from devid.gateway.service.identity import DeviceAuthenticator

from .conftest import NOW


def server_engine(data: DataDir, registry, limits=E.ServerLimits(), clock=lambda: NOW, ciphers=None):
    gw = data.issuer("gateway")
    mfg, op = data.cert("manufacturing"), data.cert("operational")
    ctx = contexts.server_context(gw.cert, [op], gw.key, [mfg, op], [mfg, op],
                                  ciphers=ciphers or contexts.CIPHERS_CCM8_AND_GCM)
    auth = DeviceAuthenticator(mfg, op, data.config.identity, registry, clock)
    return E.ServerEngine(ctx, auth, limits)


def client_context_for(cert: x509.Certificate, chain, key, root: x509.Certificate, ciphers=None):
    return contexts.client_context(cert, chain, key, root, ciphers=ciphers or contexts.CIPHERS_CCM8_AND_GCM)


def client_context_from_bundle(bundle: Path, ciphers=None):
    chain = x509.load_pem_x509_certificates((bundle / "chain.pem").read_bytes())
    root = x509.load_pem_x509_certificate((bundle / "ca.pem").read_bytes())
    return client_context_for(chain[0], chain[1:], keys.load_plain_key(bundle / "key.pem"), root, ciphers)


@dataclass
class FakeNetwork:
    """Carries datagrams between one client engine and a server engine, with faults.

    loss: probability a datagram is dropped; dup: probability it is delivered twice; reorder:
    deliver the in-flight queue in random order. `now` is the engines' clock; it stands still
    while datagrams are delivered and moves with real time while `run` waits for the engines' next
    deadline (OpenSSL's retransmission timer, behind those deadlines, runs on real time)."""

    server: E.ServerEngine
    peer: tuple = ("10.0.0.1", 40000)
    loss: float = 0.0
    dup: float = 0.0
    reorder: bool = False
    seed: int = 1
    now: float = 0.0
    log: list = field(default_factory=list)      # (direction, size)
    wire: list = field(default_factory=list)     # (direction, datagram): everything sent, lost ones too
    server_events: list = field(default_factory=list)
    client_events: list = field(default_factory=list)

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.queue: list[tuple[str, bytes]] = []

    def _enqueue(self, direction: str, out: E.Output):
        for _, dg in out.datagrams:
            self.log.append((direction, len(dg)))
            self.wire.append((direction, dg))
            if self.rng.random() < self.loss:
                continue
            self.queue.append((direction, dg))
            if self.rng.random() < self.dup:
                self.queue.append((direction, dg))

    def from_client(self, out: E.Output):
        self.client_events += out.events
        self._enqueue("c2s", out)

    def deliver_all(self, client: E.ClientEngine):
        while self.queue:
            if self.reorder:
                self.rng.shuffle(self.queue)
            direction, dg = self.queue.pop(0)
            if direction == "c2s":
                out = self.server.receive(self.peer, dg, self.now)
                self.server_events += out.events
                self._enqueue("s2c", out)
            else:
                out = client.receive(dg, self.now)
                self.client_events += out.events
                self._enqueue("c2s", out)

    def run(self, client: E.ClientEngine, until, real_timeout: float = 20.0):
        """Start the client, then `run_existing`."""
        self.from_client(client.start(self.now))
        return self.run_existing(client, until, real_timeout)

    def run_existing(self, client: E.ClientEngine, until, real_timeout: float = 20.0):
        """Deliver everything in flight; while `until()` does not hold, wait for the earlier of
        the two engines' next deadlines (as the asyncio transport's timer does), fire their timers
        and deliver again. Returns `until()`: at once when neither engine has a deadline left
        (nothing can happen any more), or after `real_timeout` seconds."""
        end = time.monotonic() + real_timeout
        while True:
            self.deliver_all(client)
            if until():
                return True
            due = [d for d in (client.next_deadline(), self.server.next_deadline()) if d is not None]
            left = end - time.monotonic()
            if not due or left <= 0:
                return until()
            wait = min(min(due) - self.now, left)
            if wait > 0:
                started = time.monotonic()
                time.sleep(wait)                 # until the deadline, not a fixed step
                self.now += time.monotonic() - started
            self.from_client(client.handle_timeouts(self.now))
            out = self.server.handle_timeouts(self.now)
            self.server_events += out.events
            self._enqueue("s2c", out)


async def pump_client(session, out, until, timeout: float) -> None:
    """Send `out`'s datagrams, then feed what arrives to `session.client` (and send what it
    answers) until `until()` holds or `timeout` seconds pass; application data is appended to
    `session.received`. For the hand-driven client sessions below (`transport`, `queue`,
    `loop`, `client`, `received`)."""
    import asyncio
    for _, dg in out.datagrams:
        session.transport.sendto(dg)
    end = session.loop.time() + timeout
    while not until() and session.loop.time() < end:
        try:
            dg = await asyncio.wait_for(session.queue.get(), 0.2)
        except asyncio.TimeoutError:
            continue
        o = session.client.receive(dg, session.loop.time())
        session.received.extend(e.data for e in o.events if isinstance(e, E.ApplicationData))
        for _, d in o.datagrams:
            session.transport.sendto(d)


class RawCoapOverDTLS:
    """A device that speaks raw CoAP bytes over a real DTLS session (the engine's client side on
    a UDP socket): for tests that need exact message types, IDs and options on the wire.
    `local`: the (address, port) to send from, e.g. ("127.0.0.2", 0)."""

    def __init__(self, bundle: Path, port: int, local: tuple | None = None) -> None:
        self.bundle, self.port, self.local = bundle, port, local
        self.received: list[bytes] = []

    async def __aenter__(self) -> "RawCoapOverDTLS":
        import asyncio
        loop = self.loop = asyncio.get_running_loop()
        queue = self.queue = asyncio.Queue()

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data_, addr):
                queue.put_nowait(data_)
        self.transport, _ = await loop.create_datagram_endpoint(Proto, local_addr=self.local,
                                                                remote_addr=("127.0.0.1", self.port))
        self.client = E.ClientEngine(client_context_from_bundle(self.bundle), ("127.0.0.1", self.port))
        await self._pump(self.client.start(loop.time()), lambda: self.client.established)
        return self

    async def __aexit__(self, *exc) -> None:
        self.transport.close()

    async def _pump(self, out, until, timeout: float = 10.0) -> None:
        await pump_client(self, out, until, timeout)

    async def exchange(self, wire: bytes, timeout: float = 10.0):
        """Send one CoAP message; the next message received (decoded), or None after `timeout`."""
        import aiocoap
        n = len(self.received)
        await self._pump(self.client.send(wire, self.loop.time()), lambda: len(self.received) > n, timeout)
        return aiocoap.Message.decode(self.received[n]) if len(self.received) > n else None


# -- the server engine against one client over the fake network (tests of issue 10's hardening) -----

P = ("10.0.0.1", 40000)


def client_for(data, device, chain=None, **kw):
    key, cert = device
    ctx = client_context_for(cert, chain or [data.cert("manufacturing")], key, data.cert("root"))
    return E.ClientEngine(ctx, ("gw", 5684), **kw)


def connect(srv, client, peer=P, now=0.0):
    net = FakeNetwork(srv, peer=peer, now=now)
    assert net.run(client, lambda: client.established and any(
        isinstance(e, E.HandshakeComplete) for e in net.server_events), real_timeout=5), client.closed_reason
    return net


def hellos(net):
    """The ClientHellos the client sent: without, then with the cookie."""
    return [dg for d, dg in net.wire if d == "c2s" and records.parse_client_hello(dg) is not None]


def works(srv, net, client, text=b"ping"):
    """The session answers both ways."""
    events = srv.receive(net.peer, client.send(text, net.now).datagrams[0][1], net.now).events
    if E.ApplicationData(net.peer, text) not in events:
        return False
    got = client.receive(srv.send(net.peer, b"re:" + text, net.now).datagrams[0][1], net.now).events
    return E.ApplicationData(("gw", 5684), b"re:" + text) in got


def start_pending(srv, client, peer=P, now=0.0):
    """Cookie exchange and second ClientHello of `client` from `peer`; returns the server's flight."""
    ch1 = client.start(now).datagrams[0][1]
    (hvr,) = srv.receive(peer, ch1, now).datagrams
    (ch2,) = client.receive(hvr[1], now).datagrams
    flight = srv.receive(peer, ch2[1], now)
    assert flight.datagrams and not flight.events
    return [dg for _, dg in flight.datagrams]


def shuttle(srv, client, datagrams, peer=P, now=0.0):
    """Deliver server datagrams to the client, the client's answers to the server, and so on until
    quiet; returns the server's events."""
    events = []
    while datagrams:
        c2s = [dg for s2c in datagrams for _, dg in client.receive(s2c, now).datagrams]
        datagrams = []
        for dg in c2s:
            out = srv.receive(peer, dg, now)
            events += out.events
            datagrams += [d for _, d in out.datagrams]
    return events


def half_open_from(srv, data, device, peer):
    client = client_for(data, device)
    reply = srv.receive(peer, client.start(0.0).datagrams[0][1], 0.0).datagrams[0][1]
    return srv.receive(peer, client.receive(reply, 0.0).datagrams[0][1], 0.0)


# -- a client engine on a real UDP socket, driven by hand (tests that craft CoAP messages) ---------

class RawSession:
    """The client engine on a connected UDP socket to the gateway at `port`: `pump(output, until)`
    sends the engine's datagrams and feeds it the gateway's until `until()` holds (or `timeout`);
    application data received is collected in `received`. Use as `async with`."""

    def __init__(self, ssl_context, port: int) -> None:
        self.client = E.ClientEngine(ssl_context, ("127.0.0.1", port))
        self.port = port
        self.received: list[bytes] = []

    async def __aenter__(self) -> "RawSession":
        import asyncio
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        queue = self.queue

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data_, addr):
                queue.put_nowait(data_)
        self.transport, _ = await self.loop.create_datagram_endpoint(Proto, remote_addr=("127.0.0.1", self.port))
        return self

    async def __aexit__(self, *exc) -> None:
        self.transport.close()

    def now(self) -> float:
        return self.loop.time()

    async def pump(self, out, until, timeout: float = 10) -> None:
        await pump_client(self, out, until, timeout)

    async def handshake(self) -> None:
        await self.pump(self.client.start(self.now()), lambda: self.client.established)

    async def exchange(self, wire: bytes) -> None:
        """Send one CoAP message (encoded) and wait for one more answer."""
        want = len(self.received) + 1
        await self.pump(self.client.send(wire, self.now()), lambda: len(self.received) >= want)
