"""The server engine's limits, checked when they are made, and the per-address bookkeeping that
enforces two of them (what "one address" is, and the handshake rate per address).

A limit outside its range is refused with `LimitError` (a ValueError) naming the field and the
allowed range, so that a bad flag or configuration value stops the gateway at start instead of
making every handshake fail (a zero or NaN timeout) or silently admitting no device (a zero cap,
an MTU too small for the handshake).
"""

from __future__ import annotations

import math
import socket
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

# Handshakes in progress from one source address (all ports together; an IPv4 address or an
# IPv6 prefix, see `address_key`), unless set. Far above
# what a fleet produces: only handshakes *in progress* count (a full handshake takes a few round
# trips, well under a second on a LAN, a few seconds for a slow device), so 100 is 100 devices
# behind one NAT all in mid-handshake at the same instant (a factory line booting at once still
# gets in: a dropped ClientHello is retransmitted by the device and admitted when a slot frees).
# Yet it is a tenth of the global cap (1000): one address can no longer hold every slot, it
# takes ten addresses to fill them.
DEFAULT_HALF_OPEN_PER_ADDRESS = 100

# IPv6 peers count by their /64: a host is normally given a whole /64 (SLAAC, any VPS), so a
# single address would let one host take every per-address share with a handful of addresses.
DEFAULT_IPV6_PREFIX_LENGTH = 64
MIN_IPV6_PREFIX_LENGTH = 32         # a whole ISP allocation; shorter would lump strangers together

# IPv6 networks: a customer or site is usually given a /56 or a /48 (256 or 65,536 /64s), so
# counting /64s alone would let one of them hold every half-open slot with ten /64s. All the /64s
# of one /48 together get at most 300 handshakes in progress: three /64 shares, so a site with a
# few busy LANs still gets in, and it takes four /48s to fill the global cap.
DEFAULT_IPV6_NETWORK_PREFIX_LENGTH = 48
DEFAULT_HALF_OPEN_PER_IPV6_NETWORK = 300

# New handshakes per address: a token bucket (GCRA) of DEFAULT_HANDSHAKE_BURST handshakes,
# refilled at DEFAULT_HANDSHAKE_RATE a second. Only cookie-validated ClientHellos that would
# start a handshake take a token: each costs the server an ECDHE and a signature before any
# credential is seen (0.19 ms of CPU for the server's first flight, "first flight" in
# benchmarks/bench_dtls_engine.py), and an address can abort and start again within its
# half-open share. The numbers:
# - devices behind one NAT (a factory line, a site, or a carrier's CGNAT, where thousands of
#   cellular devices share one public address) retry a dropped ClientHello on their own back-off
#   (1, 2, 4 ... 60 s), so the bucket meets retry waves, not a steady queue. Simulated (devices
#   booting over 5 s, that back-off): 1,000 devices are all in after 5 s (unthrottled: the burst
#   covers them), 5,000 after 68 s, 10,000 after 308 s; with 200 and 20 a second (measured by a
#   reviewer, too slow) it was 68 s, 1,028 s and 2,228 s;
# - a site of 10,000 devices behind one address that each reconnect every 10 minutes (the idle
#   timeout) needs 17 a second, far under 100;
# - one flooding address gets 100 handshakes a second: ~2 % of a core if it aborts after the
#   server's first flight (100 x 0.19 ms), ~11 % if it completes them with a stolen credential
#   (100 x 1.1 ms), instead of a whole core. A fleet behind one address larger than this raises
#   both (flags, devid.toml [gateway]).
DEFAULT_HANDSHAKE_BURST = 1000
DEFAULT_HANDSHAKE_RATE = 100.0
MAX_HANDSHAKE_BURST = 1_000_000
MIN_HANDSHAKE_RATE = 0.001
MAX_HANDSHAKE_RATE = 1_000_000.0

# The smallest --mtu with which a full mutual-auth handshake still completes: the gateway's
# certificate chain (gateway certificate + operational CA) and the CertificateRequest naming the
# two CAs are cut into records of at most this size. Measured with the engine over the fake
# network (tests/test_dtls_hardening_limits.py::test_smallest_mtu_completes_a_handshake): 256
# completes and runs CoAP-sized records, 255 does not (OpenSSL refuses an MTU below 256 for a
# memory BIO, and the handshake then dies).
MIN_MTU = 256
MAX_MTU = 65507                     # the largest UDP payload over IPv4

MAX_HANDSHAKE_TIMEOUT = 600.0       # ten minutes: a handshake not done by then never will be
MAX_IDLE_TIMEOUT = 7 * 86400.0      # a week
MAX_COOKIE_ROTATION = 3600.0        # a cookie (and a replay of it) lives up to two rotations


class LimitError(ValueError):
    """A limit outside its range. `field` is the ServerLimits field, `allowed` a short text of
    the allowed range, `value` what was given."""

    def __init__(self, field: str, allowed: str, value: object) -> None:
        self.field = field
        self.allowed = allowed
        self.value = value
        super().__init__(f"{field} must be {allowed} (got {value!r})")


@dataclass(frozen=True)
class ServerLimits:
    max_sessions: int = 20_000
    max_half_open: int = 1_000
    # handshakes in progress from one IP address; None: DEFAULT_HALF_OPEN_PER_ADDRESS, or
    # max_half_open when that is lower
    max_half_open_per_address: int | None = None
    # established sessions of one device (all its certificates together); a new one closes its oldest
    max_sessions_per_device: int = 8
    handshake_timeout: float = 30.0
    idle_timeout: float = 600.0
    mtu: int = 1280
    cookie_rotation: float = 60.0       # a cookie is valid for one to two rotation periods
    # IPv6 peers in one prefix of this length count as one address (per-address cap and rate)
    ipv6_prefix_length: int = DEFAULT_IPV6_PREFIX_LENGTH
    # handshakes in progress from all the IPv6 addresses of one network of `ipv6_network_prefix_length`
    # bits together; None: DEFAULT_HALF_OPEN_PER_IPV6_NETWORK, or max_half_open when that is lower
    max_half_open_per_ipv6_network: int | None = None
    ipv6_network_prefix_length: int = DEFAULT_IPV6_NETWORK_PREFIX_LENGTH
    # new handshakes from one address: at most `handshake_burst_per_address` at once, refilled at
    # `handshake_rate_per_address` a second
    handshake_burst_per_address: int = DEFAULT_HANDSHAKE_BURST
    handshake_rate_per_address: float = DEFAULT_HANDSHAKE_RATE

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_half_open", "max_sessions_per_device"):
            _count(name, getattr(self, name), 1, None, "a whole number >= 1")
        if self.max_half_open_per_address is None:
            object.__setattr__(self, "max_half_open_per_address",
                               min(DEFAULT_HALF_OPEN_PER_ADDRESS, self.max_half_open))
        else:
            _count("max_half_open_per_address", self.max_half_open_per_address, 1, self.max_half_open,
                   f"a whole number from 1 to the half-open cap ({self.max_half_open})")
        # at least a second: less cannot span one retransmission of a lost flight (RFC 6347 §4.2.4.1)
        _seconds("handshake_timeout", self.handshake_timeout, 1.0, MAX_HANDSHAKE_TIMEOUT)
        _seconds("idle_timeout", self.idle_timeout, 0.0, MAX_IDLE_TIMEOUT)
        # at least a second: a cookie must outlive the round trip that brings it back
        _seconds("cookie_rotation", self.cookie_rotation, 1.0, MAX_COOKIE_ROTATION)
        _count("mtu", self.mtu, MIN_MTU, MAX_MTU, f"a whole number of bytes from {MIN_MTU} to {MAX_MTU}")
        _count("ipv6_prefix_length", self.ipv6_prefix_length, MIN_IPV6_PREFIX_LENGTH, 128,
               f"a whole number of bits from {MIN_IPV6_PREFIX_LENGTH} to 128")
        # (a network prefix longer than ipv6_prefix_length counts as that prefix: the cap per address)
        _count("ipv6_network_prefix_length", self.ipv6_network_prefix_length, MIN_IPV6_PREFIX_LENGTH, 128,
               f"a whole number of bits from {MIN_IPV6_PREFIX_LENGTH} to 128")
        if self.max_half_open_per_ipv6_network is None:
            object.__setattr__(self, "max_half_open_per_ipv6_network",
                               min(DEFAULT_HALF_OPEN_PER_IPV6_NETWORK, self.max_half_open))
        else:
            _count("max_half_open_per_ipv6_network", self.max_half_open_per_ipv6_network, 1, self.max_half_open,
                   f"a whole number from 1 to the half-open cap ({self.max_half_open})")
        _count("handshake_burst_per_address", self.handshake_burst_per_address, 1, MAX_HANDSHAKE_BURST,
               f"a whole number from 1 to {MAX_HANDSHAKE_BURST}")
        rate = self.handshake_rate_per_address
        if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and _finite(rate)
                and MIN_HANDSHAKE_RATE <= rate <= MAX_HANDSHAKE_RATE):
            raise LimitError("handshake_rate_per_address",
                             f"a finite number of handshakes a second from {MIN_HANDSHAKE_RATE:g} to "
                             f"{MAX_HANDSHAKE_RATE:.0f}", rate)


def _finite(value: int | float) -> bool:
    """math.isfinite, but an int of any size (TOML allows them) is finite, not an OverflowError."""
    return isinstance(value, int) or math.isfinite(value)


def _count(name: str, value: object, low: int, high: int | None, allowed: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        raise LimitError(name, allowed, value)


def _seconds(name: str, value: object, low: float, high: float) -> None:
    allowed = (f"a finite number of seconds > 0 and at most {high:g}" if low == 0 else
               f"a finite number of seconds from {low:g} to {high:g}")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
    if not ok or not (value > low if low == 0 else value >= low) or value > high:
        raise LimitError(name, allowed, value)


# -- one address ----------------------------------------------------------------------------------

def address_key(peer: Hashable, ipv6_prefix_length: int) -> Hashable:
    """What the per-address limits count by: an IPv4 address (an IPv4-mapped IPv6 one as the
    IPv4 address), an IPv6 address's prefix of `ipv6_prefix_length` bits (`2001:db8:1:2::/64`),
    anything else (a name in tests, a non-IP transport) as it is. A few microseconds (inet_pton,
    not `ipaddress`, which takes ~100 us for an IPv6 address); only computed on the way to a
    new handshake, never for an established session's datagrams."""
    host = peer[0] if isinstance(peer, tuple) else peer
    if not isinstance(host, str) or ":" not in host:
        return host
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])     # without a scope id
    except OSError:
        return host
    if packed[:12] == b"\x00" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    drop = 128 - ipv6_prefix_length
    prefix = (int.from_bytes(packed, "big") >> drop << drop).to_bytes(16, "big")
    return f"{socket.inet_ntop(socket.AF_INET6, prefix)}/{ipv6_prefix_length}"


# -- the handshake rate per address ------------------------------------------------------------------

# Addresses whose bucket is not full again that the rate table keeps, at most. A bucket is full
# again `burst / rate` seconds after its last handshake at the latest (10 s with the defaults),
# and a worker starts at most ~5,000 handshakes a second (0.19 ms each), so at most ~50,000
# addresses can have a bucket that is not full at once: beyond this, the least recently used one
# is forgotten (a fresh, full bucket for it) only under a flood from more addresses than that, or
# with a rate set far below the default. ~165 bytes an address (measured): at most ~11 MB.
RATE_TABLE_CAPACITY = 65_536


class HandshakeRate:
    """A token bucket per address, as GCRA (one float per address: its theoretical arrival
    time; the bucket is full when that is not in the future). `admit(key, now)` takes a token
    and says True, or says False (nothing taken) when the address has none left.

    Memory is bounded: the table holds only addresses whose bucket is not full again (a full
    bucket is the same as no entry), oldest admission first; each admission forgets the full
    ones at the front, and at `capacity` the least recently admitted address is forgotten even
    if its bucket is not full."""

    def __init__(self, rate: float, burst: int, capacity: int = RATE_TABLE_CAPACITY) -> None:
        self.interval = 1.0 / rate
        # a thousandth of a token more: the burst-th handshake at one instant must not be refused
        # for a rounding error of the float sum (it was, measured: 199 of 200 at some times)
        self.tolerance = (burst - 1 + 1e-3) * self.interval
        self.capacity = capacity
        self.evicted = 0                 # addresses forgotten before their bucket was full
        self._tat: OrderedDict[Hashable, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tat)

    def admit(self, key: Hashable, now: float) -> bool:
        table = self._tat
        tat = max(table.get(key, now), now)
        if tat - now > self.tolerance:
            return False
        table[key] = tat + self.interval
        table.move_to_end(key)
        while table:                                  # the full buckets at the front
            oldest, when = next(iter(table.items()))
            if when > now:
                break
            del table[oldest]
        if len(table) > self.capacity:
            table.popitem(last=False)
            self.evicted += 1
        return True
