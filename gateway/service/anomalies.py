"""Anomaly signals (docs/operations.md#anomaly-signals): patterns an operator should look at, each
counted in `devid_anomalies_total{kind}` (no identity in the labels) and logged as one `anomaly`
line on the `devid.anomaly` logger (WARNING) that names the device, so an alert can say who.

    refusals          one identity refused `refusals` times within `refusals_window` (refused
                      handshakes of its certificates, and requests answered 4.xx on its sessions)
    verdict-drop      a device's verdict is below affirming and its previous one was affirming
                      (read from the attestation log, so it holds across workers and restarts)
    renewal-storm     one device renewed `renewals` times within `renewals_window`
    many-addresses    one identity completed handshakes from `addresses` different IP addresses
                      within `addresses_window`

A kind is raised at most once per identity per its window (the log stays bounded under attack).

Memory: the state of at most `max_identities` identities (least recently seen dropped first,
counted in `devid_anomaly_evictions_total`); each holds at most `refusals` + `renewals` times and
`addresses` addresses. Only identities the gateway's CAs issued are tracked (a refused handshake
names a device only when its chain validated; anything else is counted by reason, not by
identity), yet a stolen credential, or many, cannot grow the state beyond the cap. With
`--workers N` the per-identity counts are per worker (a device's handshakes from one address and
port stay on one worker; from many ports they may spread), so thresholds are reached per worker;
verdict-drop reads the registry and is exact.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

from cryptography import x509
from cryptography.x509.oid import NameOID

from devid.gateway.dtls.alerts import CertificateRefused
from devid.gateway.store.gauges import previous_tier
from devid.gateway.system import metrics

log = logging.getLogger("devid.anomaly")

KINDS = ("refusals", "verdict-drop", "renewal-storm", "many-addresses")
for _kind in KINDS:         # every kind's series exists at 0 from the start: increase() sees the first one
    metrics.ANOMALIES.labels(_kind)


@dataclass(frozen=True)
class AnomalySettings:
    refusals: int = 20
    refusals_window: float = 600.0          # seconds
    renewals: int = 3
    renewals_window: float = 3600.0
    addresses: int = 5
    addresses_window: float = 3600.0
    max_identities: int = 10_000


class _State:
    __slots__ = ("refused", "renewed", "addresses", "raised")

    def __init__(self, settings: AnomalySettings) -> None:
        self.refused: deque[float] = deque(maxlen=settings.refusals)
        self.renewed: deque[float] = deque(maxlen=settings.renewals)
        self.addresses: OrderedDict[str, float] = OrderedDict()     # address -> last seen
        self.raised: dict[str, float] = {}                          # kind -> when last raised


def _guarded(method):
    @functools.wraps(method)
    def call(self, *args):
        try:
            method(self, *args)
        except Exception:
            log.exception("anomaly tracking failed")
    return call


class AnomalyTracker:
    """Per-identity tracking, bounded; `registry` (optional) answers a device's previous verdict."""

    def __init__(self, settings: AnomalySettings | None = None, registry: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or AnomalySettings()
        self.registry = registry
        self.clock = clock
        self._states: OrderedDict[str, _State] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def _state(self, serial: str) -> _State:
        state = self._states.get(serial)
        if state is None:
            state = self._states[serial] = _State(self.settings)
            while len(self._states) > self.settings.max_identities:
                self._states.popitem(last=False)
                metrics.ANOMALY_EVICTIONS.inc()
            metrics.ANOMALY_TRACKED.set(len(self._states))
        else:
            self._states.move_to_end(serial)
        return state

    def _raise(self, state: _State | None, kind: str, serial: str, every: float | None, **fields) -> None:
        now = self.clock()
        if state is not None:
            last = state.raised.get(kind)
            if last is not None and every is not None and now - last < every:
                return
            state.raised[kind] = now
        metrics.ANOMALIES.labels(kind).inc()
        log.warning("anomaly", extra={"result": kind, "serial": serial, **fields})

    @staticmethod
    def _within(times: deque, now: float, window: float) -> bool:
        """The deque is full and its oldest time is within the window: maxlen events in the window."""
        return len(times) == times.maxlen and now - times[0] <= window

    # -- what the gateway reports (each guarded: a signal lost never fails a request) -----------

    @_guarded
    def refused(self, serial: str, what: str) -> None:
        """A refusal of `serial`: what = "handshake" or "request"."""
        s = self.settings
        state = self._state(serial)
        now = self.clock()
        state.refused.append(now)
        if self._within(state.refused, now, s.refusals_window):
            self._raise(state, "refusals", serial, s.refusals_window, count=s.refusals,
                        window=s.refusals_window, last=what)

    @_guarded
    def renewed(self, serial: str) -> None:
        s = self.settings
        state = self._state(serial)
        now = self.clock()
        state.renewed.append(now)
        if self._within(state.renewed, now, s.renewals_window):
            self._raise(state, "renewal-storm", serial, s.renewals_window, count=s.renewals,
                        window=s.renewals_window)

    @_guarded
    def seen(self, serial: str, address: str) -> None:
        """A completed handshake of `serial` from `address` (an IP address, without the port)."""
        s = self.settings
        state = self._state(serial)
        now = self.clock()
        seen = state.addresses
        seen[address] = now
        seen.move_to_end(address)
        while seen and now - next(iter(seen.values())) > s.addresses_window:
            seen.popitem(last=False)
        while len(seen) > s.addresses:
            seen.popitem(last=False)
        if len(seen) >= s.addresses:
            self._raise(state, "many-addresses", serial, s.addresses_window, count=len(seen),
                        window=s.addresses_window, address=address)

    @_guarded
    def verdict(self, serial: str, tier: str, log_seq: int | None) -> None:
        """A verdict for `serial`; below affirming after an affirming one raises verdict-drop."""
        if tier == "affirming" or self.registry is None:
            return          # the happy path reads nothing
        try:
            previous = previous_tier(self.registry, serial, log_seq)
        except Exception as exc:        # the verdict is already decided: a failed read only loses the signal
            log.debug("anomaly: cannot read the previous verdict of %s: %s", serial, exc)
            return
        if previous == "affirming":
            self._raise(None, "verdict-drop", serial, None, previous=previous, tier=tier, log_seq=log_seq)


def subject_serial(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    return str(attrs[0].value) if attrs else None


class RefusalWitness:
    """Wraps the DTLS engine's authenticator: when it refuses a certificate (whose chain OpenSSL
    validated: the serial is one our CAs signed), `take()` tells the transport which device it
    named, so the refused handshake counts for that identity."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self._refused: str | None = None

    def authenticate(self, leaf: x509.Certificate, intermediates: list[x509.Certificate]):
        try:
            return self.inner.authenticate(leaf, intermediates)
        except CertificateRefused:
            self._refused = subject_serial(leaf)
            raise

    def take(self) -> str | None:
        serial, self._refused = self._refused, None
        return serial
