"""The sans-I/O DTLS engine over a fake network: no sockets, real OpenSSL, real certificates."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca.revocation import revoke_device
from devid.gateway.dtls import engine as E
from devid.gateway.dtls import records

from .conftest import NOW, make_csr, register_device
from .dtls_helpers import FakeNetwork, client_context_for, server_engine


@pytest.fixture
def device(data, ca):
    key, issued = register_device(ca, "SN1", "temperature-sensor")
    return key, issued.cert


def client_for(data, device, ctx=None, **kw):
    key, cert = device
    ctx = ctx or client_context_for(cert, [data.cert("manufacturing")], key, data.cert("root"))
    return E.ClientEngine(ctx, ("gw", 5684), **kw)


def established(net, client):
    return lambda: client.established and any(isinstance(e, E.HandshakeComplete) for e in net.server_events)


def test_handshake_and_data_both_ways(data, registry, device):
    srv = server_engine(data, registry)
    net = FakeNetwork(srv)
    client = client_for(data, device)
    assert net.run(client, established(net, client), real_timeout=5)
    (done,) = [e for e in net.server_events if isinstance(e, E.HandshakeComplete)]
    assert (done.identity.serial, done.identity.kind, done.identity.device_type) == \
        ("SN1", "factory", "temperature-sensor")
    assert done.cipher == "ECDHE-ECDSA-AES128-CCM8" and not done.resumed
    net.from_client(client.send(b"ping", net.now))
    net.deliver_all(client)
    assert E.ApplicationData(net.peer, b"ping") in net.server_events
    out = srv.send(net.peer, b"pong", net.now)
    net._enqueue("s2c", out)
    net.deliver_all(client)
    assert E.ApplicationData(("gw", 5684), b"pong") in net.client_events
    # every datagram respected the MTU
    assert max(size for _, size in net.log) <= 1280


def test_cookie_exchange_is_stateless_and_never_amplifies(data, registry, device):
    srv = server_engine(data, registry)
    client = client_for(data, device)
    hello = client.start(0.0).datagrams
    assert len(hello) == 1 and records.is_client_hello(hello[0][1])
    for i in range(50):   # the same ClientHello from 50 addresses: 50 cookies, no state
        out = srv.receive(("10.9.0.%d" % i, 1000 + i), hello[0][1], 0.0)
        (reply,) = out.datagrams
        assert records.split_records(reply[1])[0][13] == 3            # HelloVerifyRequest
        assert len(reply[1]) <= len(hello[0][1])
    assert srv.sessions == {} and srv.half_open == 0
    assert srv.stats.cookies_sent == 50


def test_cookie_is_bound_to_the_address(data, registry, device):
    srv = server_engine(data, registry)
    client = client_for(data, device)
    hello = client.start(0.0).datagrams[0][1]
    cookie_reply = srv.receive(("10.0.0.1", 1), hello, 0.0).datagrams[0][1]
    second = client.receive(cookie_reply, 0.0).datagrams[0][1]           # ClientHello with cookie
    # the cookie replayed from another address gets only a fresh cookie, no state
    out = srv.receive(("10.0.0.2", 2), second, 0.0)
    assert srv.sessions == {}
    assert records.split_records(out.datagrams[0][1])[0][13] == 3
    # from the right address it opens a handshake
    out = srv.receive(("10.0.0.1", 1), second, 0.0)
    assert list(srv.sessions) == [("10.0.0.1", 1)] and srv.half_open == 1


def test_cookie_expires_after_two_rotations(data, registry, device):
    srv = server_engine(data, registry, limits=E.ServerLimits(cookie_rotation=10.0))
    client = client_for(data, device)
    hello = client.start(0.0).datagrams[0][1]
    cookie_reply = srv.receive(("10.0.0.1", 1), hello, 0.0).datagrams[0][1]
    second = client.receive(cookie_reply, 0.0).datagrams[0][1]
    srv.receive(("10.0.0.1", 1), second, 25.0)           # two rotations later
    assert srv.sessions == {}


def test_non_hello_datagrams_from_strangers_are_dropped(data, registry):
    srv = server_engine(data, registry)
    for junk in (b"", b"\x17\xfe\xfd" + b"\x00" * 20, b"\x16\xfe\xfd\x00\x01" + b"\x00" * 20, b"hello world"):
        assert srv.receive(("10.0.0.3", 3), junk, 0.0).datagrams == []
    assert srv.sessions == {} and srv.stats.dropped == 4


@pytest.mark.parametrize("fault", [dict(loss=0.3, seed=3), dict(dup=0.5, seed=4), dict(reorder=True, seed=5),
                                   dict(loss=0.2, dup=0.3, reorder=True, seed=6)])
def test_handshake_survives_loss_duplication_reordering(data, registry, device, fault):
    srv = server_engine(data, registry)
    net = FakeNetwork(srv, **fault)
    client = client_for(data, device)
    assert net.run(client, established(net, client), real_timeout=25), (client.closed_reason, net.server_events)
    # duplicated application records are dropped by the replay window: delivered once
    net.loss = 0.0
    net.dup = 1.0
    net.from_client(client.send(b"once", net.now))
    net.deliver_all(client)
    assert [e for e in net.server_events if isinstance(e, E.ApplicationData)] == [E.ApplicationData(net.peer, b"once")]


def test_handshake_timeout_frees_the_slot(data, registry, device):
    srv = server_engine(data, registry, limits=E.ServerLimits(handshake_timeout=5.0))
    client = client_for(data, device)
    hello = client.start(0.0).datagrams[0][1]
    reply = srv.receive(("10.0.0.1", 1), hello, 0.0).datagrams[0][1]
    srv.receive(("10.0.0.1", 1), client.receive(reply, 0.0).datagrams[0][1], 0.0)
    assert srv.half_open == 1
    # the client goes silent: at the deadline the half-open handshake is dropped
    assert srv.next_deadline() is not None and srv.next_deadline() <= 5.0
    out = srv.handle_timeouts(5.0)
    assert any(isinstance(e, E.HandshakeFailed) and e.reason == "handshake timeout" for e in out.events)
    assert srv.sessions == {} and srv.half_open == 0


def test_half_open_cap(data, registry, device):
    srv = server_engine(data, registry, limits=E.ServerLimits(max_half_open=3))
    for i in range(5):
        client = client_for(data, device)
        peer = ("10.1.0.%d" % i, 1)
        reply = srv.receive(peer, client.start(0.0).datagrams[0][1], 0.0).datagrams[0][1]
        srv.receive(peer, client.receive(reply, 0.0).datagrams[0][1], 0.0)
    assert srv.half_open == 3 and len(srv.sessions) == 3


def test_idle_timeout_closes_the_session(data, registry, device):
    srv = server_engine(data, registry, limits=E.ServerLimits(idle_timeout=60.0))
    net = FakeNetwork(srv)
    client = client_for(data, device)
    assert net.run(client, established(net, client), real_timeout=5)
    out = srv.handle_timeouts(net.now + 59.0)
    assert net.peer in srv.sessions
    out = srv.handle_timeouts(net.now + 61.0)
    assert E.SessionClosed(net.peer, "idle timeout") in out.events and srv.sessions == {}
    assert out.datagrams and records.content_types(out.datagrams[0][1]) == [records.CT_ALERT]   # close_notify


def test_idle_deadline_rounding_never_comes_before_the_timeout(data, registry, device):
    """Idle deadlines are rounded up to a step (an eighth of a short timeout); the float rounding
    must not put one a hair before last_seen + idle_timeout, or firing at it would loop forever."""
    srv = server_engine(data, registry, limits=E.ServerLimits(idle_timeout=0.3))
    net = FakeNetwork(srv, now=504.9375)          # a last_seen where ceil(x/step)*step < x in floats
    client = client_for(data, device)
    assert net.run(client, established(net, client), real_timeout=5)
    deadline = srv.next_deadline()
    assert deadline >= 504.9375 + 0.3
    out = srv.handle_timeouts(deadline)           # returns, and the session is gone
    assert E.SessionClosed(net.peer, "idle timeout") in out.events and srv.sessions == {}


def test_sessions_per_device_are_capped_oldest_first(data, ca, registry, device):
    """One device certificate from three source ports with a cap of 2: the third handshake
    closes the first session; another device's session is untouched."""
    srv = server_engine(data, registry, limits=E.ServerLimits(max_sessions_per_device=2))
    key2, issued2 = register_device(ca, "SN2", "temperature-sensor")
    other = (key2, issued2.cert)
    nets = []
    for i, dev in enumerate([other, device, device, device]):
        net = FakeNetwork(srv, peer=("10.0.0.%d" % (i + 1), 40000))
        client = client_for(data, dev)
        assert net.run(client, established(net, client), real_timeout=5)
        nets.append(net)
    closed = [e for net in nets for e in net.server_events if isinstance(e, E.SessionClosed)]
    assert closed == [E.SessionClosed(("10.0.0.2", 40000), "too many sessions for this device")]
    assert set(srv.sessions) == {("10.0.0.1", 40000), ("10.0.0.3", 40000), ("10.0.0.4", 40000)}
    # the bookkeeping follows sessions that end on their own
    srv.close(("10.0.0.3", 40000), nets[2].now)
    assert sorted(len(v) for v in srv._by_device.values()) == [1, 1]


def test_peer_close_notify(data, registry, device):
    srv = server_engine(data, registry)
    net = FakeNetwork(srv)
    client = client_for(data, device)
    assert net.run(client, established(net, client), real_timeout=5)
    net.from_client(client.close(net.now))
    net.deliver_all(client)
    assert E.SessionClosed(net.peer, "closed by peer") in net.server_events and srv.sessions == {}


def test_ticket_resumption(data, registry, device):
    srv = server_engine(data, registry)
    net = FakeNetwork(srv)
    first = client_for(data, device)
    assert net.run(first, established(net, first), real_timeout=5)
    session = first.session
    net2 = FakeNetwork(srv, peer=("10.0.0.1", 40001))
    second = client_for(data, device, ctx=first.context, session=session)
    assert net2.run(second, established(net2, second), real_timeout=5)
    (done,) = [e for e in net2.server_events if isinstance(e, E.HandshakeComplete)]
    assert done.resumed and done.identity.serial == "SN1"
    assert srv.stats.resumed == 1
    # the resumed session runs on devid's record layer too, both ways
    assert srv.sessions[net2.peer].rl is not None
    net2.from_client(second.send(b"after resumption", net2.now))
    net2._enqueue("s2c", srv.send(net2.peer, b"answer", net2.now))
    net2.deliver_all(second)
    assert E.ApplicationData(net2.peer, b"after resumption") in net2.server_events
    assert E.ApplicationData(("gw", 5684), b"answer") in net2.client_events


def test_resumption_of_a_revoked_device_is_refused(data, registry, device):
    srv = server_engine(data, registry)
    net = FakeNetwork(srv)
    first = client_for(data, device)
    assert net.run(first, established(net, first), real_timeout=5)
    revoke_device(registry, "SN1", "keyCompromise", NOW)
    net2 = FakeNetwork(srv, peer=("10.0.0.1", 40001))
    second = client_for(data, device, ctx=first.context, session=first.session)
    net2.run(second, lambda: any(isinstance(e, E.HandshakeFailed) for e in net2.server_events), real_timeout=5)
    assert any(isinstance(e, E.HandshakeFailed) and "revoked" in e.reason for e in net2.server_events)
    assert ("10.0.0.1", 40001) not in srv.sessions


def refused(data, registry, key, cert, chain, expect):
    srv = server_engine(data, registry)
    net = FakeNetwork(srv)
    ctx = client_context_for(cert, chain, key, data.cert("root"))
    client = E.ClientEngine(ctx, ("gw", 5684))
    net.run(client, lambda: any(isinstance(e, E.HandshakeFailed) for e in net.server_events), real_timeout=5)
    failures = [e.reason for e in net.server_events if isinstance(e, E.HandshakeFailed)]
    assert failures and expect in failures[0], failures
    assert not client.established and srv.sessions == {}
    # the client was told: it got an alert, not silence
    assert client.closed_reason is not None
    return failures[0]


def test_refused_revoked_device(data, registry, device):
    revoke_device(registry, "SN1", "keyCompromise", NOW)
    refused(data, registry, device[0], device[1], [data.cert("manufacturing")], "revoked")


def test_refused_expired_certificate(data, ca, registry):
    key = ec.generate_private_key(ec.SECP256R1())
    register_device(ca, "SN2")
    from datetime import timedelta
    old = ca.issue_operational(make_csr(key)[0], "SN2", NOW - timedelta(days=120))
    refused(data, registry, key, old.cert, [data.cert("operational")], "expired")


def test_refused_other_ca(tmp_path, data, registry):
    from devid.gateway.app.datadir import DataDir
    other = DataDir(tmp_path / "other")
    other.init(NOW)
    reg = other.open_registry()
    key, issued = register_device(other.authority(reg), "SN1")
    refused(data, registry, key, issued.cert, [other.cert("manufacturing")], "certificate refused")


def test_refused_gateway_certificate_as_client(data, registry):
    gw = data.issuer("gateway")
    reason = refused(data, registry, gw.key, gw.cert, [data.cert("operational")], "certificate")
    assert "purpose" in reason or "not a" in reason or "does not validate" in reason, reason


def test_refused_without_client_certificate(data, registry):
    from OpenSSL import SSL
    from devid.gateway.dtls import contexts
    srv = server_engine(data, registry)
    net = FakeNetwork(srv)
    ctx = contexts._base(SSL.DTLS_CLIENT_METHOD, contexts.CIPHERS_CCM8_AND_GCM)
    client = E.ClientEngine(ctx, ("gw", 5684))
    net.run(client, lambda: any(isinstance(e, E.HandshakeFailed) for e in net.server_events), real_timeout=5)
    assert [e for e in net.server_events if isinstance(e, E.HandshakeFailed)]
    assert not client.established and srv.sessions == {}


# -- the record layer that replaces OpenSSL once the handshake is done ------------------------------

from devid.gateway.dtls.recordlayer import RecordLayer  # noqa: E402


@pytest.mark.parametrize("takeover", [False, True], ids=["openssl-client", "client-takeover"])
@pytest.mark.parametrize("suite", ["ECDHE-ECDSA-AES128-CCM8", "ECDHE-ECDSA-AES128-GCM-SHA256"])
def test_record_layer_interoperates_with_openssl(data, registry, device, suite, takeover):
    """After the handshake the server's OpenSSL object is gone. With an OpenSSL client, it still
    reads what we seal and we read what it seals; with ClientEngine(takeover=True) both sides are
    on our record layer. In both suites, both ways, and close_notify ends the server's session."""
    srv = server_engine(data, registry)
    net = FakeNetwork(srv)
    key, cert = device
    ctx = client_context_for(cert, [data.cert("manufacturing")], key, data.cert("root"), ciphers=suite.encode()
                             + (b":@SECLEVEL=0" if "CCM8" in suite else b""))
    client = E.ClientEngine(ctx, ("gw", 5684), takeover=takeover)
    assert net.run(client, established(net, client), real_timeout=5)
    s = srv.sessions[net.peer]
    assert s.conn is None and s.rl is not None and client.cipher == suite
    assert (client._s.rl is not None) is takeover
    for i in range(20):
        net.from_client(client.send(b"up %d" % i, net.now))
        net._enqueue("s2c", srv.send(net.peer, b"down %d" % i, net.now))
    net.deliver_all(client)
    assert [e.data for e in net.server_events if isinstance(e, E.ApplicationData)] == [b"up %d" % i for i in range(20)]
    assert [e.data for e in net.client_events if isinstance(e, E.ApplicationData)] == [b"down %d" % i for i in range(20)]
    with pytest.raises(E.LocalProtocolError, match="exceeds the DTLS record payload limit"):
        client.send(b"x" * 1280, net.now)
    net.from_client(client.close(net.now))
    net.deliver_all(client)
    assert net.peer not in srv.sessions and client.state == E.State.CLOSED


def test_record_layer_drops_tampered_replayed_and_foreign_records(data, registry, device):
    srv = server_engine(data, registry)
    net = FakeNetwork(srv)
    client = client_for(data, device)
    assert net.run(client, established(net, client), real_timeout=5)
    record = client.send(b"genuine", net.now).datagrams[0][1]
    tampered = record[:-1] + bytes([record[-1] ^ 1])
    wrong_epoch = record[:3] + b"\x00\x02" + record[5:]
    for dg in (tampered, wrong_epoch, record, record):
        net.server_events += srv.receive(net.peer, dg, net.now).events
    assert [e.data for e in net.server_events if isinstance(e, E.ApplicationData)] == [b"genuine"]


def test_replay_window():
    rl = RecordLayer("ECDHE-ECDSA-AES128-GCM-SHA256", b"m" * 48, b"c" * 32, b"s" * 32, server=True)
    for seq in (0, 1, 5, 3, 100):
        assert not rl.seen(seq)
        rl.mark(seq)
        assert rl.seen(seq)
    assert not rl.seen(99) and not rl.seen(64) and rl.seen(36) and rl.seen(5)   # 36 is outside the window
    rl.mark(99)
    assert rl.seen(99) and not rl.seen(98)


def test_seal_open_roundtrip_between_two_record_layers():
    args = (b"k" * 48, b"c" * 32, b"s" * 32)
    server = RecordLayer("ECDHE-ECDSA-AES128-CCM8", *args, server=True, write_seq=7)
    client = RecordLayer("ECDHE-ECDSA-AES128-CCM8", *args, server=False)
    record = server.seal(23, b"payload")
    assert record[5:11] == (7).to_bytes(6, "big") and len(record) == 13 + 8 + 7 + 8
    assert client.open(record) == (23, b"payload")
    assert client.open(record) is None                 # replay
    assert server.open(client.seal(23, b"x")) == (23, b"x")


def test_lost_final_flight_is_resent_after_takeover(data, registry, device):
    """The server's last handshake flight is lost: the client retransmits its own, and the server,
    whose OpenSSL object is already gone, answers with the stored flight."""
    srv = server_engine(data, registry)
    net = FakeNetwork(srv)
    client = client_for(data, device)
    net.from_client(client.start(net.now))
    dropped = []
    while net.queue:
        direction, dg = net.queue.pop(0)
        if direction == "c2s":
            out = srv.receive(net.peer, dg, net.now)
            net.server_events += out.events
            if any(isinstance(e, E.HandshakeComplete) for e in out.events):
                dropped = [d for _, d in out.datagrams]      # the final flight never arrives
                continue
            net._enqueue("s2c", out)
        else:
            net.from_client(client.receive(dg, net.now))
    assert dropped and not client.established and srv.sessions[net.peer].conn is None
    assert net.run_existing(client, lambda: client.established, real_timeout=10)
    net.from_client(client.send(b"after", net.now))
    net.deliver_all(client)
    assert E.ApplicationData(net.peer, b"after") in net.server_events
    assert srv.sessions[net.peer].last_flight is None
