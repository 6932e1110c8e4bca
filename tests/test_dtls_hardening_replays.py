"""Replays of a ClientHello-with-cookie within the cookie's life (issue 10, second review), over
the fake network: real OpenSSL, real certificates, no sockets. The engine remembers every
ClientHello whose cookie opened a handshake for as long as that cookie can be valid; a replay gets
no answer and no state, wherever the peer's session stands, while a client's own retransmission
still reaches its handshake."""

from __future__ import annotations

import itertools
import random
import time

import pytest

from devid.gateway.dtls import engine as E
from devid.gateway.dtls import records
from devid.gateway.dtls.cookies import Cookies, bind, hello_key

from .conftest import register_device
from .dtls_helpers import P, client_for, connect, hellos, server_engine, shuttle, start_pending, works


@pytest.fixture
def device(ca):
    key, issued = register_device(ca, "SN1", "temperature-sensor")
    return key, issued.cert


def close_from_client(srv, net, client):
    """The device ends its session with close_notify, as after an enrollment."""
    events = []
    for _, dg in client.close(net.now).datagrams:
        events += srv.receive(net.peer, dg, net.now).events
    assert E.SessionClosed(net.peer, "closed by peer") in events and net.peer not in srv.sessions


def test_replay_after_close_notify_gets_nothing(data, registry, device):
    """The normal flow ends with close_notify; an observer then replays the ClientHello-with-cookie
    from the device's address and port while the cookie is still valid (at once, and 100 s later:
    60 s rotation, so it is valid up to 120 s). No datagram, no event, no handshake, no half-open
    slot. (Before: a handshake started, its flight ~1,600 bytes for a ~170-byte replay, and held a
    slot.) The first ClientHello, without a cookie, gets the same stateless HelloVerifyRequest as
    from anyone, never larger than itself."""
    srv = server_engine(data, registry)
    client = client_for(data, device)
    net = connect(srv, client)
    close_from_client(srv, net, client)
    first, with_cookie = hellos(net)
    for when in (net.now, net.now + 1.0, net.now + 100.0):
        assert srv.cookies.check(records.parse_client_hello(with_cookie).cookie,
                                 bind(P, records.parse_client_hello(with_cookie).params))
        out = srv.receive(P, with_cookie, when)
        assert out.datagrams == [] and out.events == []
        assert srv.sessions == {} and srv.half_open == 0
    assert srv.stats.replays == 3 and srv.stats.handshakes == 1
    (hvr,) = srv.receive(P, first, net.now + 100.0).datagrams
    assert records.split_records(hvr[1])[0][13] == 3 and len(hvr[1]) <= len(first)
    assert srv.sessions == {} and srv.half_open == 0


def test_replay_beside_a_newer_session_leaves_its_pending_handshake(data, registry, device):
    """Session 1 ends with close_notify, session 2 is established from the same address and port,
    and the device starts a third handshake (pending beside session 2). A replay of session 1's
    ClientHello-with-cookie, its cookie still valid, is dropped: it neither supersedes the pending
    handshake (before: `HandshakeFailed(superseded by a newer handshake)`) nor touches session 2;
    the pending handshake then completes and replaces session 2."""
    srv = server_engine(data, registry)
    first = client_for(data, device)
    net1 = connect(srv, first)
    close_from_client(srv, net1, first)
    replay = hellos(net1)[1]
    second = client_for(data, device)
    net2 = connect(srv, second, now=5.0)
    session2 = srv.sessions[P]
    third = client_for(data, device)
    flight = start_pending(srv, third, now=6.0)
    pending = session2.pending
    assert pending is not None and srv.half_open == 1
    out = srv.receive(P, replay, 7.0)
    assert out.datagrams == [] and out.events == [] and srv.stats.replays == 1
    assert srv.sessions[P] is session2 and session2.pending is pending and pending.state == E.State.HANDSHAKING
    net2.now = 7.0
    assert works(srv, net2, second)
    events = shuttle(srv, third, flight, now=7.0)
    assert [type(e) for e in events] == [E.SessionClosed, E.HandshakeComplete]
    assert srv.sessions[P] is pending and pending.state == E.State.ESTABLISHED and srv.stats.failed == 0


def cookie_exchange(srv, client, peer=P, now=0.0):
    """The client's two ClientHellos; returns its ClientHello-with-cookie and the server's answer."""
    (hvr,) = srv.receive(peer, client.start(now).datagrams[0][1], now).datagrams
    (second,) = client.receive(hvr[1], now).datagrams
    return second[1], srv.receive(peer, second[1], now)


def retransmission(client, started, deadline=10.0):
    """The client's own retransmission of its last flight, on OpenSSL's real-time timer (about a
    second): fired at the client's own deadlines, on a clock that was 0.0 at `started` (real
    time), until it comes or `deadline` seconds pass."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        time.sleep(max(0.0, min(started + client.next_deadline(), end) - time.monotonic()))
        out = client.handle_timeouts(time.monotonic() - started)
        if out.datagrams:
            (datagram,) = out.datagrams
            return datagram[1]
    raise AssertionError("the client never retransmitted")


@pytest.mark.parametrize("beside", [False, True], ids=["no-session", "beside-a-session"])
def test_retransmitted_client_hello_with_cookie_still_completes(data, registry, device, beside):
    """The server's first flight is lost; the client retransmits its ClientHello-with-cookie (same
    random and cookie, a new record sequence number). The replay memory holds that ClientHello,
    yet the retransmission reaches the handshake in progress, which answers with its flight again,
    and the handshake completes. With a session beside, the new handshake then replaces it."""
    srv = server_engine(data, registry)
    if beside:
        connect(srv, client_for(data, device))
    client = client_for(data, device)
    started = time.monotonic()
    original, lost = cookie_exchange(srv, client)                 # the flight is never delivered
    assert lost.datagrams and srv.half_open == 1
    again = retransmission(client, started)
    hello, first = records.parse_client_hello(again), records.parse_client_hello(original)
    assert (hello.random, hello.cookie) == (first.random, first.cookie) and again[5:11] != original[5:11]
    assert srv.cookies.seen(hello_key(P, hello.random))
    out = srv.receive(P, again, 0.0)
    assert len(out.datagrams) == len(lost.datagrams) and srv.stats.replays == 0
    events = shuttle(srv, client, [d for _, d in out.datagrams])
    assert [type(e) for e in events] == ([E.SessionClosed] if beside else []) + [E.HandshakeComplete]
    assert client.established and srv.sessions[P].state == E.State.ESTABLISHED and srv.half_open == 0


# -- the memory's bound -------------------------------------------------------------------------------

def test_replay_memory_is_bounded_and_still_catches_every_valid_cookie(data, registry, device):
    """With room for 3 ClientHellos per secret, 10 handshakes from 10 addresses rotate the secrets
    early three times: neither set ever holds more than 3. Then each of the 10 ClientHellos-with-
    cookie is replayed: those whose cookie is still valid are remembered (no answer), the older
    ones' cookies died with their secret (a HelloVerifyRequest, no larger than the replay, and no
    state). No replay starts a handshake."""
    srv = server_engine(data, registry)
    srv.cookies.capacity = 3
    peers = [(f"10.0.1.{i}", 5000) for i in range(10)]
    sent = []
    for peer in peers:
        second, out = cookie_exchange(srv, client_for(data, device), peer)
        assert out.datagrams and max(len(s) for s in srv.cookies._seen) <= 3
        sent.append(second)
    assert srv.cookies.early_rotations == 3 and srv.half_open == 10
    for peer in peers:
        srv.close(peer, 0.0)
    assert srv.sessions == {} and srv.half_open == 0
    answers = []
    for peer, second in zip(peers, sent):
        out = srv.receive(peer, second, 0.0)
        assert out.events == [] and srv.sessions == {} and srv.half_open == 0
        assert all(records.split_records(d)[0][13] == 3 and len(d) <= len(second) for _, d in out.datagrams)
        answers.append(len(out.datagrams))
    # the cookies of the last three were made under a secret still live (the previous one), and
    # their ClientHellos are remembered; the first seven's cookies died with their secret
    assert answers == [1] * 7 + [0] * 3 and srv.stats.replays == 3


def test_a_cookie_that_checks_is_always_of_a_remembered_hello():
    """The invariant of cookies.py, over a long random walk of timed and early rotations: every
    ClientHello remembered while its cookie was valid stays `seen` for as long as its cookie
    `check`s, and neither set grows beyond the capacity."""
    rng = random.Random(7)
    counter = itertools.count()
    cookies = Cookies(10.0, lambda n: next(counter).to_bytes(n, "big"), capacity=5)
    now = 0.0
    issued = []              # (bound, cookie): a HelloVerifyRequest sent
    remembered = []          # (bound, cookie, key)
    for step in range(5000):
        now += rng.choice([0.0] * 8 + [0.1, 1.0, 7.0, 25.0])
        cookies.rotate(now)
        bound = bind(("10.0.0.1", step), step.to_bytes(4, "big"))
        issued.append((bound, cookies.make(bound)))
        bound, cookie = issued[rng.randrange(max(0, len(issued) - 20), len(issued))]
        if cookies.check(cookie, bound):
            key = hello_key(bound, b"")
            if not cookies.seen(key):
                cookies.remember(key, now)
                remembered.append((bound, cookie, key))
        assert max(len(s) for s in cookies._seen) <= 5
        for bound, cookie, key in remembered[-40:]:
            assert not cookies.check(cookie, bound) or cookies.seen(key), step
    assert cookies.early_rotations > 50 and now / 10.0 > 50 and len(remembered) > 500


def test_early_rotation_does_not_fail_the_handshake_that_caused_it(data, registry, device):
    """OpenSSL checks the cookie a second time when it reads the ClientHello in the handshake. A
    ClientHello whose cookie was made under the previous secret, and whose remembering fills the
    set and rotates the secrets early (dropping that secret), still completes its handshake."""
    srv = server_engine(data, registry)
    srv.cookies.capacity = 1
    late = client_for(data, device)
    (hvr,) = srv.receive(P, late.start(0.0).datagrams[0][1], 0.0).datagrams     # secret 1
    (second,) = late.receive(hvr[1], 61.0).datagrams
    other = ("10.0.0.2", 1)
    connect(srv, client_for(data, device), peer=other, now=61.0)                 # secret 2; the set is full
    assert srv.cookies.early_rotations == 0
    out = srv.receive(P, second[1], 61.0)                                        # cookie of secret 1
    assert srv.cookies.early_rotations == 1 and out.datagrams and srv.stats.failed == 0
    events = shuttle(srv, late, [d for _, d in out.datagrams], now=61.0)
    assert [type(e) for e in events] == [E.HandshakeComplete] and late.established


def test_a_timed_rotation_never_follows_an_early_one_at_once():
    """A cookie made just before an early rotation stays valid until the next rotation, which
    is a full period later, not the next multiple of the period (that once came 0.1 s after)."""
    counter = itertools.count()
    cookies = Cookies(60.0, lambda n: next(counter).to_bytes(n, "big"), capacity=1)
    cookies.rotate(0.0)
    cookies.remember(b"a" * 16, 59.8)                    # fills the set
    bound = bind(("10.0.0.1", 1), b"hello")
    cookie = cookies.make(bound)                         # sent at 59.85 s
    cookies.remember(b"b" * 16, 59.9)                    # full: early rotation at 59.9 s
    assert cookies.early_rotations == 1
    for now in (60.05, 100.0, 119.8):                    # no timed rotation before 119.9 s
        cookies.rotate(now)
        assert cookies.check(cookie, bound), now
    cookies.rotate(119.95)                               # one timed rotation: the cookie's secret is gone
    assert not cookies.check(cookie, bound)
