"""The server engine's limits, checked when they are made.

A limit outside its range is refused with `LimitError` (a ValueError) naming the field and the
allowed range, so that a bad flag or configuration value stops the gateway at start instead of
making every handshake fail (a zero or NaN timeout) or silently admitting no device (a zero cap,
an MTU too small for the handshake).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Handshakes in progress from one source IP address (all ports together), unless set. Far above
# what a fleet produces: only handshakes *in progress* count (a full handshake takes a few round
# trips, well under a second on a LAN, a few seconds for a slow device), so 100 is 100 devices
# behind one NAT all in mid-handshake at the same instant (a factory line booting at once still
# gets in: a dropped ClientHello is retransmitted by the device and admitted when a slot frees).
# Yet it is a tenth of the global cap (1000): one address can no longer hold every slot, it
# takes ten addresses to fill them.
DEFAULT_HALF_OPEN_PER_ADDRESS = 100

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


def _count(name: str, value: object, low: int, high: int | None, allowed: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        raise LimitError(name, allowed, value)


def _seconds(name: str, value: object, low: float, high: float) -> None:
    allowed = (f"a finite number of seconds > 0 and at most {high:g}" if low == 0 else
               f"a finite number of seconds from {low:g} to {high:g}")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value > low if low == 0 else value >= low) or value > high:
        raise LimitError(name, allowed, value)
