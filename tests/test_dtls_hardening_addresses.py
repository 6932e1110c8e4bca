"""What "one address" is to the DTLS engine, and the rate of new handshakes per address (issue 10,
second review), over the fake network: real OpenSSL, real certificates, no sockets. An IPv6 host
counts by its /64 (a host with a /64 cannot take every per-address share by itself), and one
address cannot start handshakes faster than its token bucket refills, each being an ECDHE and a
signature for the server before any credential is seen."""

from __future__ import annotations

import pytest

from devid.gateway.dtls import engine as E
from devid.gateway.dtls import records
from devid.gateway.dtls.limits import HandshakeRate, address_key

from .conftest import register_device
from .dtls_helpers import client_for, connect, half_open_from, server_engine, shuttle

FATAL_ALERT = b"\x15\xfe\xfd\x00\x00" + b"\x00\x00\x00\x00\x00\x05" + b"\x00\x02" + b"\x02\x28"   # handshake_failure


@pytest.fixture
def device(ca):
    key, issued = register_device(ca, "SN1", "temperature-sensor")
    return key, issued.cert


def v6(address, port=5684):
    return (address, port, 0, 0)          # what an AF_INET6 socket gives


# -- one address --------------------------------------------------------------------------------------

@pytest.mark.parametrize("peer,length,key", [
    (("10.0.0.66", 1), 64, "10.0.0.66"),
    (v6("::ffff:10.0.0.66"), 64, "10.0.0.66"),                  # IPv4-mapped: the IPv4 address
    (v6("2001:db8:0:1:aaaa:bbbb:cccc:dddd"), 64, "2001:db8:0:1::/64"),
    (v6("2001:DB8:0:1::1"), 64, "2001:db8:0:1::/64"),
    (v6("2001:db8:0:1:aaaa:bbbb:cccc:dddd"), 48, "2001:db8::/48"),
    (v6("2001:db8:0:1:aaaa:bbbb:cccc:dddd"), 128, "2001:db8:0:1:aaaa:bbbb:cccc:dddd/128"),
    (v6("fe80::1:2%eth0"), 64, "fe80::/64"),                    # a scope id does not make another address
    (("gw", 5684), 64, "gw"),
])
def test_address_key(peer, length, key):
    assert address_key(peer, length) == key


def test_one_ipv6_prefix_cannot_hold_every_half_open_slot(data, registry, device):
    """15 addresses of one /64 (one host: SLAAC, a VPS) send valid-cookie ClientHellos: together
    they get the per-address share (4), not every slot; a host in another /64 still completes a
    handshake. (Before: each address had its own share, the 15 took all 10 slots and the other
    host was dropped.) With --ipv6-prefix-length 128 each address counts alone again."""
    limits = E.ServerLimits(max_half_open=10, max_half_open_per_address=4, handshake_timeout=5.0)
    srv = server_engine(data, registry, limits=limits)
    for i in range(1, 16):
        half_open_from(srv, data, device, v6(f"2001:db8:0:1::{i:x}"))
    assert srv.half_open == 4 and srv.stats.dropped_per_address == 11 and srv.stats.dropped == 0
    assert srv._half_open_by_address == {"2001:db8:0:1::/64": 4, "2001:db8::/48": 4}
    connect(srv, client_for(data, device), peer=v6("2001:db8:0:2::1"))
    srv.handle_timeouts(5.0)
    assert srv.half_open == 0 and srv._half_open_by_address == {}

    per_address = server_engine(data, registry, limits=E.ServerLimits(
        max_half_open=10, max_half_open_per_address=4, ipv6_prefix_length=128))
    for i in range(1, 6):
        half_open_from(per_address, data, device, v6(f"2001:db8:0:1::{i:x}"))
    assert per_address.half_open == 5 and per_address.stats.dropped_per_address == 0


def test_one_ipv6_network_cannot_hold_every_half_open_slot(data, registry, device):
    """A customer given a /56 or a /48 has hundreds of /64s: all the /64s of one /48 together get
    `max_half_open_per_ipv6_network` handshakes in progress, and another network still gets in.
    (Before: ten /64s of one /56 filled the global cap.)"""
    limits = E.ServerLimits(max_half_open=10, max_half_open_per_address=4, max_half_open_per_ipv6_network=6,
                            handshake_timeout=5.0)
    srv = server_engine(data, registry, limits=limits)
    for i in range(1, 16):                           # 15 /64s of 2001:db8:0::/48, two addresses each
        for host in (1, 2):
            half_open_from(srv, data, device, v6(f"2001:db8:0:{i:x}::{host}"))
    assert srv.half_open == 6 and srv.stats.dropped_per_address == 24 and srv.stats.dropped == 0
    assert srv._half_open_by_address["2001:db8::/48"] == 6
    connect(srv, client_for(data, device), peer=v6("2001:db8:1:1::1"))     # another /48
    srv.handle_timeouts(5.0)
    assert srv.half_open == 0 and srv._half_open_by_address == {}
    defaults = E.ServerLimits()
    assert (defaults.max_half_open_per_ipv6_network, defaults.ipv6_network_prefix_length) == (300, 48)
    assert E.ServerLimits(max_half_open=50).max_half_open_per_ipv6_network == 50


def test_ipv4_mapped_peers_count_with_their_ipv4_address(data, registry, device):
    srv = server_engine(data, registry, limits=E.ServerLimits(max_half_open=10, max_half_open_per_address=4))
    for port in range(1, 4):
        half_open_from(srv, data, device, ("10.0.0.66", port))
    for port in range(4, 7):
        half_open_from(srv, data, device, v6("::ffff:10.0.0.66", port))
    assert srv.half_open == 4 and srv._half_open_by_address == {"10.0.0.66": 4}


# -- the rate of new handshakes per address -----------------------------------------------------------

def start_and_abort(srv, client, peer, now):
    """A cookie exchange, the ClientHello-with-cookie, then a fatal alert instead of the client's
    flight: the handshake is gone at once, its half-open slot free again. Returns what the
    server sent in answer to the ClientHello-with-cookie."""
    (hvr,) = srv.receive(peer, client.start(now).datagrams[0][1], now).datagrams
    (second,) = client.receive(hvr[1], now).datagrams
    out = srv.receive(peer, second[1], now)
    srv.receive(peer, FATAL_ALERT, now)
    return out, second[1]


def test_one_address_cannot_start_handshakes_faster_than_its_rate(data, registry, device):
    """One address starts and aborts handshakes in a loop from one port: each is gone at once, so
    the half-open cap (1 here) never holds it back. With a burst of 3 and 1 a second, 3 of 10 get
    the server's flight (an ECDHE and a signature each); the other 7 get no answer at all and are
    counted. (Before: all 10.) Another address is not affected; a second later the address has one
    more handshake, and one only."""
    limits = E.ServerLimits(max_half_open_per_address=1, handshake_burst_per_address=3,
                            handshake_rate_per_address=1.0)
    srv = server_engine(data, registry, limits=limits)
    attacker = ("10.0.0.66", 4444)
    answered = []
    for _ in range(10):
        out, _ = start_and_abort(srv, client_for(data, device), attacker, 0.0)
        answered.append(sum(len(d) for _, d in out.datagrams))
        assert srv.half_open == 0 and srv.sessions == {}
    assert [n > 0 for n in answered] == [True] * 3 + [False] * 7
    assert srv.stats.rate_limited == 7 and srv.stats.failed == 3 and srv.stats.dropped_per_address == 0
    connect(srv, client_for(data, device), peer=("10.0.0.7", 1))
    assert [bool(start_and_abort(srv, client_for(data, device), attacker, 1.0)[0].datagrams)
            for _ in range(2)] == [True, False]
    assert srv.stats.rate_limited == 8


def test_a_client_hello_dropped_by_the_rate_gets_in_when_it_is_retransmitted(data, registry, device):
    """A factory line behind one NAT, in small: the ClientHello-with-cookie beyond the burst is
    dropped without being remembered, so the device's retransmission of it (same random, same
    cookie, still valid) opens its handshake once a token is back, and the device gets in."""
    limits = E.ServerLimits(handshake_burst_per_address=2, handshake_rate_per_address=0.5)
    srv = server_engine(data, registry, limits=limits)
    nat = "192.0.2.1"
    for port in (1, 2):
        assert half_open_from(srv, data, device, (nat, port)).datagrams
    late = client_for(data, device)
    (hvr,) = srv.receive((nat, 3), late.start(0.0).datagrams[0][1], 0.0).datagrams
    (second,) = late.receive(hvr[1], 0.0).datagrams
    assert srv.receive((nat, 3), second[1], 0.0).datagrams == [] and srv.stats.rate_limited == 1
    assert srv.receive((nat, 3), second[1], 1.0).datagrams == [] and srv.stats.rate_limited == 2
    out = srv.receive((nat, 3), second[1], 2.0)                  # 1 / 0.5 s after the burst
    assert out.datagrams and srv.stats.replays == 0
    events = shuttle(srv, late, [d for _, d in out.datagrams], peer=(nat, 3), now=2.0)
    assert [type(e) for e in events] == [E.HandshakeComplete] and late.established


def test_replays_and_capped_hellos_take_no_token(data, registry, device):
    """Only a ClientHello that would start a handshake takes a token: one dropped by the
    per-address half-open cap does not (it comes back later), nor does a replay."""
    limits = E.ServerLimits(max_half_open_per_address=1, handshake_burst_per_address=2,
                            handshake_rate_per_address=0.001)
    srv = server_engine(data, registry, limits=limits)
    half_open_from(srv, data, device, ("10.0.0.66", 1))
    for port in range(2, 12):
        assert half_open_from(srv, data, device, ("10.0.0.66", port)).datagrams == []
    assert srv.stats.dropped_per_address == 10 and srv.stats.rate_limited == 0
    srv.close(("10.0.0.66", 1), 0.0)
    out, second = start_and_abort(srv, client_for(data, device), ("10.0.0.66", 20), 0.0)
    assert out.datagrams                                         # the second token
    for _ in range(5):
        assert srv.receive(("10.0.0.66", 20), second, 0.0).datagrams == []
    assert srv.stats.replays == 5 and srv.stats.rate_limited == 0
    assert start_and_abort(srv, client_for(data, device), ("10.0.0.66", 21), 0.0)[0].datagrams == []
    assert srv.stats.rate_limited == 1


def test_the_rate_counts_ipv6_by_network(data, registry, device):
    """IPv6 handshakes are rated per network (a /48 by default), not per /64: a customer's
    hundreds of /64s share one bucket; another network has its own."""
    limits = E.ServerLimits(handshake_burst_per_address=2, handshake_rate_per_address=0.001)
    srv = server_engine(data, registry, limits=limits)
    started = [bool(start_and_abort(srv, client_for(data, device), v6(f"2001:db8:0:{i:x}::1"), 0.0)[0].datagrams)
               for i in range(1, 6)]
    assert started == [True, True, False, False, False] and srv.stats.rate_limited == 3
    assert start_and_abort(srv, client_for(data, device), v6("2001:db8:1:1::1"), 0.0)[0].datagrams


# -- the rate table's memory --------------------------------------------------------------------------

def test_rate_table_keeps_only_buckets_that_are_not_full():
    """An address leaves the table once its bucket is full again (a full bucket is the same as no
    entry): 10,000 addresses one after another, each with a burst of 2 at 10 a second, leave at
    most the few of the last 0.2 s in it."""
    rate = HandshakeRate(10.0, 2, capacity=1000)
    for i in range(10_000):
        assert rate.admit(f"10.0.{i >> 8}.{i & 255}", i * 0.05)
        assert len(rate) <= 5
    assert rate.evicted == 0


def test_rate_table_is_bounded_and_forgets_the_least_recent_first():
    """At capacity, buckets that are full again go first; only when there are none, the least
    recently admitted address (which then starts again with a full bucket). The addresses that
    stay in the table stay limited."""
    rate = HandshakeRate(1.0, 1, capacity=100)
    for i in range(100):
        assert rate.admit(i, 0.0)
    assert len(rate) == 100 and not rate.admit(99, 0.0)
    for i in range(100, 150):
        assert rate.admit(i, 0.5)
    assert len(rate) == 100 and rate.evicted == 50               # 0-49, although not full yet
    assert not rate.admit(50, 0.5) and not rate.admit(149, 0.5)  # still there: still limited
    assert rate.admit(0, 0.5) and rate.evicted == 51             # forgotten: a fresh bucket (50 goes)
    for i in range(150, 190):
        assert rate.admit(i, 1.2)               # 51-99 are full again since 1.0: they go, not 100-149
    assert rate.evicted == 51 and len(rate) == 91 and not rate.admit(120, 1.2)


def test_rate_is_a_token_bucket():
    """Burst 3 at 2 a second: 3 at once, then one every 0.5 s; tokens gather while unused, up to
    the burst."""
    rate = HandshakeRate(2.0, 3)
    assert [rate.admit("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert [rate.admit("a", 0.4), rate.admit("a", 0.5), rate.admit("a", 0.5)] == [False, True, False]
    assert [rate.admit("a", 100.0) for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize("per_second,burst", [(20.0, 200), (3.0, 7), (1 / 3, 5), (7.0, 1000)])
@pytest.mark.parametrize("start", [0.0, 12345.678, 1e6 + 0.1, 3e7 + 0.3])
def test_rate_gives_the_whole_burst_at_any_clock_reading(per_second, burst, start):
    """The burst-th token at one instant is not lost to the rounding of float sums (it was: 199 of
    200 at some clock readings), and exactly one comes back after one interval."""
    rate = HandshakeRate(per_second, burst)
    admitted = 0
    while rate.admit("a", start):
        admitted += 1
    later = start + 1 / per_second
    assert admitted == burst and [rate.admit("a", later), rate.admit("a", later)] == [True, False]


def test_dropped_client_hellos_get_no_answer_on_the_wire(data, registry, device):
    """What a rate-limited address sees: a HelloVerifyRequest for each first ClientHello (as
    anyone), nothing for a ClientHello-with-cookie beyond the rate; never more bytes than it sent."""
    srv = server_engine(data, registry, limits=E.ServerLimits(handshake_burst_per_address=1,
                                                              handshake_rate_per_address=0.001))
    start_and_abort(srv, client_for(data, device), ("10.0.0.66", 1), 0.0)
    client = client_for(data, device)
    first = client.start(0.0).datagrams[0][1]
    (hvr,) = srv.receive(("10.0.0.66", 2), first, 0.0).datagrams
    assert records.split_records(hvr[1])[0][13] == 3 and len(hvr[1]) <= len(first)
    (second,) = client.receive(hvr[1], 0.0).datagrams
    assert srv.receive(("10.0.0.66", 2), second[1], 0.0).datagrams == []
