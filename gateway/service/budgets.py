"""Per-device budgets: what one device identity may ask of the gateway, and how fast.

`Budgets` holds every limit with defaults a real fleet never reaches (a device needs one nonce,
one evidence and one /sen per enrollment, one /sren every few months); `RateLimiter` enforces
the request rates in memory, per worker process, before any registry read or write.

The rate of each action is a token bucket, kept as GCRA (the generic cell rate algorithm, RFC
2475's virtual scheduling): one float per bucket, the time at which the bucket will be full
again. A request is accepted when at most `burst - 1` intervals of credit are borrowed; then the
bucket's time moves on by one interval. A refused request changes nothing, so a flood costs the
gateway one dictionary look-up per request.

Memory is bounded: at most `tracked_devices` devices are remembered. When the table is full,
devices whose buckets are all full again are dropped first (forgetting them loses nothing); only
if that frees too little does the least recently seen device go.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Callable

ACTIONS = ("nonce", "evidence", "enroll", "renew", "config")
MAX_SUPERSEDED_GRACE = timedelta(hours=1)


@dataclass(frozen=True)
class Rate:
    """A token bucket: `burst` requests at once, then one more every `interval` seconds."""

    burst: int
    interval: float

    def __post_init__(self) -> None:
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or not 1 <= self.burst <= 10_000:
            raise ValueError(f"burst must be an integer from 1 to 10000, not {self.burst!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, (int, float)) \
                or not 0.001 <= self.interval <= 86_400:
            raise ValueError(f"interval must be 0.001 to 86400 seconds, not {self.interval!r}")


@dataclass(frozen=True)
class Budgets:
    """Every per-device limit of the enrollment service (docs/enrollment.md#budgets).

    The request rates are per worker process: with `serve --workers N` one identity gets at most
    N times them (the kernel spreads its source ports over the workers). The certificate cap is
    counted in the registry and holds across workers and restarts."""

    # unconsumed attestation nonces kept per device; one more replaces its oldest
    outstanding_nonces: int = 4
    # request rates per device (keyed by the device serial: factory and operational identities share them)
    nonce: Rate = field(default_factory=lambda: Rate(10, 60.0))
    evidence: Rate = field(default_factory=lambda: Rate(10, 60.0))
    enroll: Rate = field(default_factory=lambda: Rate(10, 60.0))
    renew: Rate = field(default_factory=lambda: Rate(5, 600.0))
    config: Rate = field(default_factory=lambda: Rate(20, 60.0))
    # operational certificates (/sen and /sren together) a device may receive in any `certificate_window`
    certificates_per_window: int = 10
    certificate_window: timedelta = timedelta(hours=24)
    # how long a superseded operational certificate may still renew and read /config (0: not at all)
    superseded_grace: timedelta = timedelta(0)
    # devices whose request rates are remembered (per worker); about 300 bytes each
    tracked_devices: int = 100_000
    # at most one log line per device per this many seconds about its refused requests
    refusal_log_interval: float = 10.0

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                value = getattr(self, name)
                shown = f"{value.total_seconds():g} s" if isinstance(value, timedelta) else repr(value)
                raise ValueError(f"budgets.{name}: {shown} is outside {allowed}")

        def integer(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        check("outstanding_nonces", integer(self.outstanding_nonces) and 1 <= self.outstanding_nonces <= 64, "1..64")
        for action in ACTIONS:
            check(action, isinstance(getattr(self, action), Rate), "a Rate")
        check("certificates_per_window", integer(self.certificates_per_window)
              and 1 <= self.certificates_per_window <= 10_000, "1..10000")
        check("certificate_window", isinstance(self.certificate_window, timedelta)
              and timedelta(minutes=1) <= self.certificate_window <= timedelta(days=30), "1 minute..30 days")
        check("superseded_grace", isinstance(self.superseded_grace, timedelta)
              and timedelta(0) <= self.superseded_grace <= MAX_SUPERSEDED_GRACE, "0..1 hour")
        check("tracked_devices", integer(self.tracked_devices) and 16 <= self.tracked_devices <= 10_000_000,
              "16..10000000")
        check("refusal_log_interval", isinstance(self.refusal_log_interval, (int, float))
              and not isinstance(self.refusal_log_interval, bool)
              and 0 <= self.refusal_log_interval <= 3600, "0..3600 seconds")

    def rate(self, action: str) -> Rate:
        return getattr(self, action)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# a device's slots in its array: one GCRA time per action, then refusals not yet logged and the
# time of its last refusal line
_REFUSED = len(ACTIONS)
_LOGGED = _REFUSED + 1
_SLOTS = _LOGGED + 1
_INDEX = {a: i for i, a in enumerate(ACTIONS)}


class RateLimiter:
    """The request-rate part of `Budgets`, for one process. Not thread-safe (one event loop)."""

    def __init__(self, budgets: Budgets, clock: Callable[[], float] = time.monotonic,
                 lines_per_second: float = 20.0) -> None:
        self.clock = clock
        self.max_devices = budgets.tracked_devices
        self.log_interval = float(budgets.refusal_log_interval)
        # (interval T, burst tolerance tau = (burst - 1) * T) per action
        self._params = [(float(budgets.rate(a).interval), (budgets.rate(a).burst - 1) * float(budgets.rate(a).interval))
                        for a in ACTIONS]
        self._devices: OrderedDict[str, array] = OrderedDict()
        # all refusal lines together, across devices: a GCRA of its own (burst 5 s worth)
        self._line_t = 1.0 / lines_per_second
        self._line_tau = 5.0
        self._line_tat = -math.inf
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._devices)

    def take(self, device: str, action: str) -> float:
        """Spend one request of `action` for `device`: 0.0 if accepted, else the seconds until
        one would be (nothing is spent then)."""
        now = self.clock()
        slots = self._devices.get(device)
        if slots is None:
            if len(self._devices) >= self.max_devices:
                self._make_room(now)
            slots = self._devices[device] = array("d", [-math.inf] * _REFUSED + [0.0, -math.inf])
        else:
            self._devices.move_to_end(device)
        i = _INDEX[action]
        interval, tau = self._params[i]
        tat = max(slots[i], now)
        if tat - now > tau:
            return tat - tau - now
        slots[i] = tat + interval
        return 0.0

    def refused(self, device: str) -> int | None:
        """Count a refusal of `device`. Returns how many of its refusals a log line should report
        now (this one included), or None while its lines are rate-limited: at most one line per
        device per `refusal_log_interval`, and at most `lines_per_second` lines in all."""
        slots = self._devices.get(device)
        if slots is None:           # cannot happen right after take(); be safe
            return 1
        slots[_REFUSED] += 1
        now = self.clock()
        if now - slots[_LOGGED] < self.log_interval:
            return None
        tat = max(self._line_tat, now)
        if tat - now > self._line_tau:
            return None             # too many lines from all devices: counted, reported later
        self._line_tat = tat + self._line_t
        count = int(slots[_REFUSED])
        slots[_REFUSED] = 0.0
        slots[_LOGGED] = now
        return count

    def _idle(self, slots: array, now: float) -> bool:
        return slots[_REFUSED] == 0 and all(slots[i] <= now for i in range(_REFUSED))

    def _make_room(self, now: float) -> None:
        """Drop every device whose buckets are full again; if that frees less than an eighth of
        the table, the least recently seen devices go too, down to seven eighths. The full pass
        then happens at most once per max/8 new devices."""
        target = self.max_devices - max(1, self.max_devices // 8)
        for key in [k for k, s in self._devices.items() if self._idle(s, now)]:
            del self._devices[key]
        while len(self._devices) > target:
            self._devices.popitem(last=False)
            self.evictions += 1
