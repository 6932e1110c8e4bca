"""Hardening of the DTLS server engine (issue 10), over the fake network: real OpenSSL, real
certificates, no sockets. Per-address half-open cap, per-device session cap, cookies bound to
the ClientHello, replayed ClientHellos, and handshakes pending beside an established session."""

from __future__ import annotations

import pytest

from devid.ca.revocation import revoke_device
from devid.gateway.dtls import engine as E
from devid.gateway.dtls import records

from .conftest import NOW, make_csr, register_device
from .dtls_helpers import (P, FakeNetwork, client_for, connect, half_open_from, hellos,
                           server_engine, shuttle, start_pending, works)



@pytest.fixture
def device(ca):
    key, issued = register_device(ca, "SN1", "temperature-sensor")
    return key, issued.cert




# -- replays ------------------------------------------------------------------------------------------

def test_replayed_client_hellos_get_no_answer_and_leave_the_session(data, registry, device):
    """An on-path observer replays both ClientHellos of a completed handshake from the session's own
    address and port, within the cookie's lifetime and long after: no datagram, no event, no state;
    the session keeps working. (Before: the one with the cookie ended the session and started a
    handshake whose flight was 46 times its size.)"""
    srv = server_engine(data, registry)
    client = client_for(data, device)
    net = connect(srv, client)
    session = srv.sessions[P]
    replay = hellos(net)
    assert len(replay) == 2 and records.parse_client_hello(replay[1]).cookie
    for when in (net.now, net.now + 1.0, net.now + 500.0):        # 500 s: the cookie has expired too
        for dg in replay:
            out = srv.receive(P, dg, when)
            assert out.datagrams == [] and out.events == []
    assert srv.stats.replays == 6 and srv.half_open == 0 and srv.sessions == {P: session}
    assert session.pending is None and srv.stats.cookies_sent == 1
    net.now += 500.0
    assert works(srv, net, client)


def test_cookie_is_bound_to_the_client_hello(data, registry, device):
    """The cookie covers the random, the cipher suites and the compression methods (and the
    version and session id): a changed ClientHello with a valid cookie gets a fresh cookie and no
    state; the unchanged one opens a handshake."""
    srv = server_engine(data, registry)
    client = client_for(data, device)
    ch1 = client.start(0.0).datagrams[0][1]
    second = client.receive(srv.receive(P, ch1, 0.0).datagrams[0][1], 0.0).datagrams[0][1]
    hello = records.parse_client_hello(second)
    body = 13 + 12                                            # record header, handshake header
    cookie_at = body + 2 + 32 + 1 + second[body + 34]         # the cookie's length byte
    suites_at = cookie_at + 1 + second[cookie_at]
    comp_at = suites_at + 2 + int.from_bytes(second[suites_at:suites_at + 2], "big")
    assert second[cookie_at + 1:suites_at] == hello.cookie
    for name, offset in (("version", body + 1), ("random", body + 2 + 7), ("cipher suite", suites_at + 3),
                         ("compression", comp_at + 1)):
        changed = bytearray(second)
        changed[offset] ^= 0x01
        out = srv.receive(P, bytes(changed), 0.0)
        assert srv.sessions == {}, name
        assert len(out.datagrams) == 1 and records.split_records(out.datagrams[0][1])[0][13] == 3, name
    srv.receive(P, second, 0.0)
    assert list(srv.sessions) == [P] and srv.half_open == 1


# -- a handshake pending beside an established session --------------------------------------------

def test_pending_handshake_replaces_the_session_only_once_complete(data, ca, registry, device):
    """The device (at the same address and port) starts over: while the new handshake is in
    progress the old session still answers; once it completes it replaces the old one, in that
    order of events, and only the new session's records are read from then on."""
    srv = server_engine(data, registry)
    old_client = client_for(data, device)
    net = connect(srv, old_client)
    old = srv.sessions[P]
    new_client = client_for(data, device)
    flight = start_pending(srv, new_client)
    assert srv.sessions[P] is old and old.pending is not None and srv.half_open == 1
    assert works(srv, net, old_client, b"during the new handshake")
    events = shuttle(srv, new_client, flight)
    assert [type(e) for e in events] == [E.SessionClosed, E.HandshakeComplete]
    assert events[0] == E.SessionClosed(P, "replaced by a new handshake") and events[1].identity.serial == "SN1"
    new = srv.sessions[P]
    assert new is not old and new.rl is not None and new_client.established
    assert srv.half_open == 0 and srv._half_open_by_address == {} and srv.stats.replaced == 1
    assert [len(v) for v in srv._by_device.values()] == [1]
    # the old client's records cannot be opened any more; the new client's are
    assert srv.receive(P, old_client.send(b"stale", 0.0).datagrams[0][1], 0.0).events == []
    net2 = FakeNetwork(srv, peer=P)
    assert works(srv, net2, new_client, b"new")


def test_pending_handshake_that_times_out_leaves_the_session(data, registry, device):
    srv = server_engine(data, registry, limits=E.ServerLimits(handshake_timeout=5.0))
    old_client = client_for(data, device)
    net = connect(srv, old_client)
    old = srv.sessions[P]
    start_pending(srv, client_for(data, device), now=1.0)
    assert srv.half_open == 1
    out = srv.handle_timeouts(6.0)
    assert out.events == [E.HandshakeFailed(P, "handshake timeout")]
    assert srv.sessions == {P: old} and old.pending is None and old.state == E.State.ESTABLISHED
    assert srv.half_open == 0 and srv._half_open_by_address == {}
    net.now = 6.0
    assert works(srv, net, old_client)


def test_pending_handshake_that_is_refused_leaves_the_session(data, ca, registry, device):
    """Someone at the session's address and port handshakes with a revoked device's certificate:
    refused, with an alert to it; the established session is untouched."""
    srv = server_engine(data, registry)
    old_client = client_for(data, device)
    net = connect(srv, old_client)
    old = srv.sessions[P]
    key2, issued2 = register_device(ca, "SN2", "temperature-sensor")
    revoke_device(registry, "SN2", "keyCompromise", NOW)
    intruder = client_for(data, (key2, issued2.cert))
    events = shuttle(srv, intruder, start_pending(srv, intruder))
    assert [type(e) for e in events] == [E.HandshakeFailed] and "revoked" in events[0].reason
    assert intruder.closed_reason is not None                   # it got an alert
    assert srv.sessions == {P: old} and old.pending is None and srv.half_open == 0
    assert works(srv, net, old_client)


def test_pending_handshake_carries_on_when_the_old_session_ends(data, registry, device):
    """The old session idles out while the new handshake runs: the new one completes on its own
    (no `replaced` event, since nothing is left to replace)."""
    srv = server_engine(data, registry, limits=E.ServerLimits(idle_timeout=60.0))
    connect(srv, client_for(data, device))
    new_client = client_for(data, device)
    flight = start_pending(srv, new_client, now=50.0)
    out = srv.handle_timeouts(61.0)
    assert E.SessionClosed(P, "idle timeout") in out.events
    assert srv.sessions[P].state == E.State.HANDSHAKING and srv.half_open == 1
    events = shuttle(srv, new_client, flight, now=61.0)
    assert [type(e) for e in events] == [E.HandshakeComplete]
    assert srv.sessions[P].state == E.State.ESTABLISHED and srv.half_open == 0 and srv.stats.replaced == 0


def test_close_ends_the_session_and_the_handshake_beside_it(data, registry, device):
    srv = server_engine(data, registry)
    connect(srv, client_for(data, device))
    start_pending(srv, client_for(data, device))
    out = srv.close(P, 1.0, "gateway shutting down")
    assert out.events == [E.SessionClosed(P, "gateway shutting down")]
    assert srv.sessions == {} and srv.half_open == 0 and srv._half_open_by_address == {}


# -- caps ---------------------------------------------------------------------------------------------

def test_one_address_cannot_hold_every_half_open_slot(data, registry, device):
    """Valid-cookie ClientHellos from many ports of one address fill only that address's share
    of the half-open slots; another address still completes a handshake. The slots come back when
    the handshakes time out."""
    srv = server_engine(data, registry, limits=E.ServerLimits(max_half_open=10, max_half_open_per_address=4,
                                                              handshake_timeout=5.0))
    for port in range(1, 16):
        half_open_from(srv, data, device, ("10.0.0.66", port))
    assert srv.half_open == 4 and srv.stats.dropped_per_address == 11 and srv.stats.dropped == 0
    connect(srv, client_for(data, device), peer=("10.0.0.7", 1))
    srv.handle_timeouts(5.0)
    assert srv.half_open == 0 and srv._half_open_by_address == {}
    half_open_from(srv, data, device, ("10.0.0.66", 99))
    assert srv.half_open == 1


def test_without_a_per_address_share_one_address_locks_others_out(data, registry, device):
    """The failure the per-address cap prevents, with the per-address cap as large as the global
    one: one address holds every slot and another address's valid ClientHello is dropped."""
    srv = server_engine(data, registry, limits=E.ServerLimits(max_half_open=4, max_half_open_per_address=4))
    for port in range(1, 8):
        half_open_from(srv, data, device, ("10.0.0.66", port))
    out = half_open_from(srv, data, device, ("10.0.0.7", 1))
    assert srv.stats.dropped_per_address == 3 and srv.stats.dropped == 1
    assert out.datagrams == [] and ("10.0.0.7", 1) not in srv.sessions


def test_default_per_address_cap():
    assert E.ServerLimits().max_half_open_per_address == 100
    assert E.ServerLimits(max_half_open=30).max_half_open_per_address == 30


def test_session_cap_counts_the_device_not_its_certificates(data, ca, registry, device):
    """SN1 connects with its factory certificate and two operational certificates (the second
    issued while the first is in use), with a cap of 2 per device: the oldest of its sessions,
    whichever certificate made it, is closed. Sessions cycling through its (current) certificates
    never hold more than 2, so another device still gets in with a session table of 5."""
    srv = server_engine(data, registry, limits=E.ServerLimits(max_sessions=5, max_sessions_per_device=2))
    key2, issued2 = register_device(ca, "SN2", "temperature-sensor")
    nets = [connect(srv, client_for(data, (key2, issued2.cert)), peer=("10.0.0.2", 1))]
    nets.append(connect(srv, client_for(data, device), peer=("10.0.0.1", 1)))       # factory
    op = data.cert("operational")
    op_keys = []
    for port in (2, 3):
        csr, op_key = make_csr()
        op_keys.append((op_key, ca.issue_operational(csr, "SN1", NOW).cert))
        nets.append(connect(srv, client_for(data, op_keys[-1], chain=[op]), peer=("10.0.0.1", port)))
    closed = [e for net in nets for e in net.server_events if isinstance(e, E.SessionClosed)]
    assert closed == [E.SessionClosed(("10.0.0.1", 1), "too many sessions for this device")]
    assert set(srv.sessions) == {("10.0.0.2", 1), ("10.0.0.1", 2), ("10.0.0.1", 3)}
    kinds = sorted(s.identity.kind for s in srv.sessions.values() if s.identity.serial == "SN1")
    assert kinds == ["operational", "operational"]
    for i in range(6):       # the device loops over its factory and current certificates from new ports
        cert = [device, op_keys[1]][i % 2]
        connect(srv, client_for(data, cert, chain=[op] if cert is not device else None), peer=("10.0.1.1", 10 + i))
    assert sum(s.identity.serial == "SN1" for s in srv.sessions.values()) == 2
    key3, issued3 = register_device(ca, "SN3", "temperature-sensor")
    connect(srv, client_for(data, (key3, issued3.cert)), peer=("10.0.0.3", 1))
    assert len(srv.sessions) == 4


def test_fragmented_client_hello_is_dropped_without_state(data, registry, device):
    """A ClientHello with a valid cookie, cut into two fragments in two records of one datagram:
    the cookie is bound to fields the engine must read itself, and OpenSSL 4.0 would accept it and
    then stall (measured), holding a half-open slot; it is dropped, no state, no answer."""
    srv = server_engine(data, registry)
    client = client_for(data, device)
    hvr = srv.receive(P, client.start(0.0).datagrams[0][1], 0.0).datagrams[0][1]
    second = client.receive(hvr, 0.0).datagrams[0][1]
    hs = second[13:]
    body = hs[12:12 + int.from_bytes(hs[1:4], "big")]
    half = len(body) // 2

    def fragment(offset, part):
        h = hs[0:6] + offset.to_bytes(3, "big") + len(part).to_bytes(3, "big") + part
        return second[0:11] + len(h).to_bytes(2, "big") + h
    fragmented = fragment(0, body[:half]) + fragment(half, body[half:])
    assert records.is_client_hello(fragmented) and records.parse_client_hello(fragmented) is None
    out = srv.receive(P, fragmented, 0.0)
    assert out.datagrams == [] and srv.sessions == {} and srv.half_open == 0 and srv.stats.dropped == 1
