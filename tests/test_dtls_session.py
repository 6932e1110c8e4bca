"""The session core both DTLS roles share (gateway/dtls/session.py), over the fake network: one
local error for a caller's misuse on both sides, one place where a peer's fault ends a session,
close_notify answered by either role, and the final flight resent by whichever role sent it."""

from __future__ import annotations

import pytest

from devid.gateway.dtls import engine as E
from devid.gateway.dtls import records
from devid.gateway.errors import GatewayError

from .conftest import register_device
from .dtls_helpers import P, FakeNetwork, client_for, connect, server_engine, works

GW = ("gw", 5684)          # the server, as the client engines here know it


@pytest.fixture
def device(ca):
    key, issued = register_device(ca, "SN1", "temperature-sensor")
    return key, issued.cert


def test_the_two_protocol_errors_are_one_family():
    for cls in (E.LocalProtocolError, E.RemoteProtocolError):
        assert issubclass(cls, E.DTLSError) and issubclass(cls, GatewayError)
    assert not issubclass(E.LocalProtocolError, E.RemoteProtocolError)
    assert not issubclass(E.RemoteProtocolError, E.LocalProtocolError)
    assert E.State("established") is E.State.ESTABLISHED and E.State.CLOSED == "closed"


def test_send_without_an_established_session_is_the_same_local_error_on_both_sides(data, registry, device):
    """Before, the server raised KeyError and the client ConnectionError; now both raise
    LocalProtocolError, and nothing changes: unknown peer, handshake in progress, closed."""
    srv = server_engine(data, registry)
    with pytest.raises(E.LocalProtocolError, match="no established DTLS session"):
        srv.send(("10.9.9.9", 1), b"x", 0.0)
    client = client_for(data, device)
    with pytest.raises(E.LocalProtocolError, match="no established DTLS session"):
        client.send(b"x", 0.0)                                      # not started
    hvr = srv.receive(P, client.start(0.0).datagrams[0][1], 0.0).datagrams[0][1]
    srv.receive(P, client.receive(hvr, 0.0).datagrams[0][1], 0.0)
    assert srv.sessions[P].state is E.State.HANDSHAKING and client.state is E.State.HANDSHAKING
    for send in (lambda: srv.send(P, b"x", 0.0), lambda: client.send(b"x", 0.0)):
        with pytest.raises(E.LocalProtocolError, match="no established DTLS session"):
            send()
    assert srv.half_open == 1 and srv.sessions[P].state is E.State.HANDSHAKING   # untouched

    client = client_for(data, device)
    net = connect(srv, client, peer=("10.0.0.2", 40000))
    assert works(srv, net, client)
    srv.close(net.peer, net.now)
    client.close(net.now)
    for send in (lambda: srv.send(net.peer, b"x", net.now), lambda: client.send(b"x", net.now)):
        with pytest.raises(E.LocalProtocolError, match="no established DTLS session"):
            send()


@pytest.mark.parametrize("takeover", [False, True], ids=["openssl-client", "client-takeover"])
def test_close_notify_is_answered_by_the_client_too(data, registry, device, takeover):
    """The server closes (idle, revoked, shutting down): the client answers close_notify with its
    own, whether OpenSSL or the record layer holds its session (before, only OpenSSL did), and
    reports SessionClosed. The answer reaches a server that has forgotten the peer: dropped."""
    srv = server_engine(data, registry)
    client = client_for(data, device, takeover=takeover)
    net = connect(srv, client)
    assert (client._s.rl is not None) is takeover
    (bye,) = srv.close(net.peer, net.now, "gateway shutting down").datagrams
    out = client.receive(bye[1], net.now)
    assert out.events == [E.SessionClosed(GW, "closed by peer")] and client.state is E.State.CLOSED
    (answer,) = out.datagrams
    assert records.content_types(answer[1]) == [records.CT_ALERT]
    dropped = srv.stats.dropped
    assert srv.receive(net.peer, answer[1], net.now).datagrams == [] and srv.sessions == {}
    assert srv.stats.dropped == dropped + 1


def test_a_fatal_alert_from_the_peer_ends_the_session_and_raises_nothing(data, registry, device):
    """A peer's fault is reported, never raised: a fatal alert (handshake_failure) on an
    established session becomes SessionClosed with the alert as reason, on either side."""
    srv = server_engine(data, registry)
    client = client_for(data, device, takeover=True)
    net = connect(srv, client)
    fatal = b"\x02\x28"
    out = srv.receive(net.peer, client._s.rl.seal(records.CT_ALERT, fatal), net.now)
    assert out.events == [E.SessionClosed(net.peer, "alert from peer: 0228")] and srv.sessions == {}

    other = client_for(data, device, takeover=True)
    net = connect(srv, other, peer=("10.0.0.3", 40000))
    out = other.receive(srv.sessions[net.peer].rl.seal(records.CT_ALERT, fatal), net.now)
    assert out.events == [E.SessionClosed(GW, "alert from peer: 0228")] and other.closed_reason == "alert from peer: 0228"


@pytest.mark.parametrize("takeover", [False, True], ids=["openssl-client", "client-takeover"])
def test_resumed_handshake_client_resends_its_lost_final_flight(data, registry, device, takeover):
    """In a resumed handshake the client sends the last flight (ChangeCipherSpec, Finished): if it
    is lost, the server retransmits its own flight and the client must send its last one again
    (RFC 6347 4.2.4). With the record layer holding the client's session, the session core does
    it as it does for the server's last flight of a full handshake (before, such a client dropped
    the server's retransmission and the server's handshake timed out)."""
    srv = server_engine(data, registry)
    first = client_for(data, device)
    connect(srv, first)
    peer = ("10.0.0.1", 40001)
    client = E.ClientEngine(first.context, GW, session=first.session, takeover=takeover)
    net = FakeNetwork(srv, peer=peer)
    net.from_client(client.start(net.now))
    lost = []
    while net.queue:
        direction, dg = net.queue.pop(0)
        if direction == "c2s":
            out = srv.receive(peer, dg, net.now)
            net.server_events += out.events
            net._enqueue("s2c", out)
        else:
            out = client.receive(dg, net.now)
            net.client_events += out.events
            if client.established and not lost:
                lost = out.datagrams                      # the client's final flight never arrives
                continue
            net._enqueue("c2s", out)
    (done,) = [e for e in net.client_events if isinstance(e, E.HandshakeComplete)]
    assert done.resumed and lost and srv.sessions[peer].state is E.State.HANDSHAKING
    assert (client._s.last_flight is not None) is takeover       # the core kept it
    assert net.run_existing(client, lambda: any(isinstance(e, E.HandshakeComplete) for e in net.server_events),
                            real_timeout=10)
    (done,) = [e for e in net.server_events if isinstance(e, E.HandshakeComplete)]
    assert done.resumed and srv.sessions[peer].last_flight is None   # the server's was not the last flight
    assert works(srv, net, client)
    assert client._s.last_flight is None                      # the server's answer shows it has ours
