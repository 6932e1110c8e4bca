"""Certificate lifecycle on autopilot: `devid agent` (docs/enrollment.md#devid-agent).

On a device (or for a field engineer), for one enrolled bundle: read the operational
certificate, and once it has less than the renewal threshold left (the `--renew-before` flag,
else the configuration's `renewal.window_days`, else 30 days) renew it through the renew flow the
other device commands use (`renew_one_flow` over `enroll.as_operational`: EST /sren with the
operational identity, the new certificate and the configuration in one answer), or, with
`attest`, through the attested enrollment `devid enroll` runs (`enroll.enroll`: the factory
identity, fresh evidence for a nonce, EST /sen), so each renewal proves the device's state again.
When the gateway refuses the operational certificate as superseded or expired (a renewal whose
answer was lost after the gateway committed it; a device that was away past its certificate's
end), the agent falls back to that attested enrollment; a revoked device stops it. While the gateway
is away or refuses, retry with exponential backoff and full jitter: attempt n waits a random time
in [0, min(cap, initial * 2**(n-1))], the cap the configuration's `renewal.retry_seconds` (default
3600 s). Between checks it sleeps until the certificate enters its threshold, at most
`max_sleep` (an hour) at a time, so a changed clock is noticed, plus up to 10 % of jitter. A
certificate that is due the moment it was issued (a threshold longer than the validity) is
renewed again only once half its remaining validity has passed.

The identity is never lost half-way: the flow checks the answer (a certificate for the new key,
for this device, chaining to the bundle's root) before anything is written, and the new key and
chain are then installed through a journal: first op-next.pem (key and chain in one file,
written atomically), then op-key.pem, op-cert.pem and op-chain.pem (each atomically), then the
journal is removed (op-chain.pem, the file readers load the certificate from, is replaced
last). A crash before the journal is complete leaves the old identity; after it, the new one:
`recover` (run by the agent before each check) completes an install the journal holds, or
removes a journal that does not hold a valid identity.

Every decision is one JSON log line on the `devid.agent` logger (events in `EVENTS`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devid.ca import keys
from devid.ca.identity import format_serial
from devid.gateway.device.enroll import OPERATIONAL, ConfigNotFetched, as_operational, enroll, store_config
from devid.gateway.device.flow import Done, Issued
from devid.gateway.device.flow_one import renew_one_flow
from devid.gateway.device.identity import (Firmware, device_type_of, load_bundle, operational_files,
                                           root_verifier, serial_of)
from devid.gateway.device.protocol import EnrollFailed, parse_gateway
from devid.gateway.errors import BundleError
from devid.gateway.system.fs import fsync_path, write_atomic

log = logging.getLogger("devid.agent")
# without a configured handler (`devid agent --once` without --log) the lines go nowhere, not to
# Python's last-resort handler on stderr (the command's outcome is its one line and exit status)
log.addHandler(logging.NullHandler())

DEFAULT_THRESHOLD = timedelta(days=30)     # the seed's renewal threshold, when nothing else says
DEFAULT_RETRY_INITIAL = 10.0               # s: the first retry's backoff ceiling
DEFAULT_RETRY_CAP = 3600.0                 # s: the backoff ceiling's cap without renewal.retry_seconds
DEFAULT_MAX_SLEEP = 3600.0                 # s: the longest sleep between two checks
WAKE_JITTER = 0.10                         # a sleep is lengthened by up to this fraction, at random
PENDING = "op-next.pem"                    # the install journal: the new key and chain, in one file
_KEY_END = b"-----END PRIVATE KEY-----\n"

# the events the agent logs (docs/enrollment.md#devid-agent)
EVENTS = ("agent-start", "agent-check", "agent-renewed", "agent-renew-failed", "agent-config-failed",
          "agent-fallback", "agent-revoked", "agent-sleep", "agent-recovered", "agent-stop")
RENEW, ATTESTED = "renew", "attested"      # the two paths of a renewal (`agent-renewed`'s `path`)

_DURATION = re.compile(r"^([0-9]+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class AgentError(Exception):
    """The agent cannot work on this bundle at all (not enrolled, unreadable): it stops."""


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `3600s` (a positive whole number and one unit); ValueError otherwise."""
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"expected a duration like 30d, 12h, 90m or 3600s, got {text!r}")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def _days(delta: timedelta) -> float:
    return round(delta.total_seconds() / 86400, 3)


# -- what the device was told -----------------------------------------------------------------------

def _renewal_config(directory: Path) -> dict:
    """The `renewal` map of the configuration the device keeps (config.cbor), or {}."""
    try:
        config = cbor2.loads((directory / "config.cbor").read_bytes())
    except Exception:
        return {}
    renewal = config.get("renewal") if isinstance(config, dict) else None
    return renewal if isinstance(renewal, dict) else {}


def _positive_int(value) -> int | None:
    return value if type(value) is int and value > 0 else None


def threshold_of(directory: Path, flag: timedelta | None) -> tuple[timedelta, str]:
    """(the renewal threshold, where it comes from: `flag`, `configuration` or `default`)."""
    if flag is not None:
        return flag, "flag"
    days = _positive_int(_renewal_config(directory).get("window_days"))
    if days is not None:
        return timedelta(days=days), "configuration"
    return DEFAULT_THRESHOLD, "default"


def retry_cap_of(directory: Path, flag: float | None) -> float:
    """The backoff ceiling's cap: the flag, else the configuration's renewal.retry_seconds, else 3600 s."""
    if flag is not None:
        return flag
    seconds = _positive_int(_renewal_config(directory).get("retry_seconds"))
    return float(seconds) if seconds is not None else DEFAULT_RETRY_CAP


# -- the identity on disk -------------------------------------------------------------------------------

def current_certificate(directory: Path) -> x509.Certificate:
    """The operational certificate of the bundle (its key must match it); AgentError if none."""
    try:
        return load_bundle(directory, **OPERATIONAL)[0]
    except (BundleError, keys.KeyFileError) as exc:
        raise AgentError(f"no usable operational identity: {exc} (enroll the device first)") from None


def install(directory: Path, issued: Issued) -> None:
    """Store a new operational identity so that a crash at any point leaves the old one or the
    new one: the journal first (one atomic file), then the three files, then no journal."""
    key_pem = keys.plain_key(issued.key)
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in issued.chain)
    write_atomic(directory / PENDING, key_pem + chain_pem, 0o600)
    _complete(directory, issued)


def _complete(directory: Path, issued: Issued) -> None:
    for name, data, mode in operational_files(issued.key, issued.chain):
        write_atomic(directory / name, data, mode)
    (directory / PENDING).unlink(missing_ok=True)
    fsync_path(directory)


def _pending(directory: Path) -> Issued | None:
    """The identity the journal holds, if it is whole and valid: a key, and a certificate for it,
    for this device, chaining to the bundle's root."""
    data = (directory / PENDING).read_bytes()
    head, sep, chain_pem = data.partition(_KEY_END)
    try:
        key = serialization.load_pem_private_key(head + sep, None)
        chain = x509.load_pem_x509_certificates(chain_pem)
        factory, _, _, root = load_bundle(directory)
    except (ValueError, TypeError, BundleError, keys.KeyFileError):
        return None
    leaf = chain[0]
    if leaf.public_key() != key.public_key() or serial_of(leaf) != serial_of(factory):
        return None
    try:
        root_verifier(root)(leaf, chain[1:])
    except Exception:
        return None
    return Issued(key, chain)


def recover(directory: Path) -> str | None:
    """Finish what a crash interrupted: `completed` (the journal's identity installed),
    `discarded` (a journal that does not hold a valid identity removed; the old one stays), or
    None (no journal)."""
    if not (directory / PENDING).exists():
        return None
    issued = _pending(directory)
    if issued is None:
        (directory / PENDING).unlink(missing_ok=True)
        fsync_path(directory)
        return "discarded"
    _complete(directory, issued)
    return "completed"


# -- one renewal --------------------------------------------------------------------------------------------

async def renew(directory: Path, gateway_uri: str, timeout: float) -> tuple[x509.Certificate, str | None]:
    """Renew through the renew flow (EST /sren, Accept 62) and install the new identity: (the new
    certificate, why the configuration in the answer was not stored, or None). EnrollFailed when
    nothing was installed."""
    installed: list[x509.Certificate] = []

    def on_step(done: Done) -> None:
        if done.step == "renew":
            install(directory, done.value)
            installed.append(done.value.certificate)
        elif done.step == "config":
            store_config(directory, done.value)

    try:
        await as_operational(directory, gateway_uri, timeout, lambda factory, root: renew_one_flow(
            serial_of(factory), device_type_of(factory), root_verifier(root)), on_step)
    except EnrollFailed as exc:
        if not installed:
            raise
        return installed[0], str(exc)    # renewed; only the configuration part was unreadable
    return installed[0], None


def firmware_of(directory: Path) -> Firmware | None:
    """The firmware the bundle claims in its evidence (DIR/firmware.json), or None (no evidence:
    for a type whose policy waives attestation). EnrollFailed at step `firmware` if unreadable."""
    return Firmware.from_options(directory, None, None, None, None)


async def attested(directory: Path, gateway_uri: str,
                   timeout: float) -> tuple[x509.Certificate, str | None, str | None]:
    """A new operational identity through the attested enrollment of `devid enroll` (the factory
    identity, evidence of firmware.json for a fresh nonce, EST /sen; the default one-request
    flow), installed through the journal: (the new certificate, why the configuration was not
    stored or None, the verdict's tier or None). EnrollFailed when nothing was installed (a policy
    with `reenroll = false` refuses at step `enroll`)."""
    try:
        result = await enroll(directory, gateway_uri, firmware_of(directory), timeout=timeout, store=install)
    except ConfigNotFetched as exc:
        return exc.certificate, exc.reason, None
    return result.certificate, None, result.verdict


def refusal_of(exc: EnrollFailed) -> str | None:
    """What a failed renewal says about the certificate it presented: `revoked` (the device or its
    certificate is revoked: trying again is pointless), `refused` (a bad_certificate or
    certificate_expired alert: superseded, expired, or unknown to the gateway), or None."""
    if exc.step != "connect":
        return None
    said = exc.reason.lower()
    if "certificate revoked" in said:
        return "revoked"
    if "bad certificate" in said or "certificate expired" in said:
        return "refused"
    return None


async def _renew_by_path(directory: Path, settings: "AgentSettings", cert: x509.Certificate, now: datetime):
    """One renewal by the path it takes: (the new certificate, the configuration's problem or
    None, the path, the verdict or None)."""
    if not settings.attest:
        cause = reason = None
        if now >= cert.not_valid_after_utc:
            cause, reason = "expired", "the operational certificate has expired"
        else:
            try:
                new, problem = await renew(directory, settings.gateway, settings.timeout)
                return new, problem, RENEW, None
            except EnrollFailed as exc:
                if refusal_of(exc) != "refused":
                    raise
                cause, reason = "refused", exc.reason
        _event("agent-fallback", logging.WARNING, cause=cause, reason=reason)
    new, problem, verdict = await attested(directory, settings.gateway, settings.timeout)
    return new, problem, ATTESTED, verdict


# -- the loop ---------------------------------------------------------------------------------------------

@dataclass
class AgentSettings:
    gateway: str
    directory: Path
    renew_before: timedelta | None = None      # None: the configuration's, else 30 days
    timeout: float = 30.0                      # s per step of a renewal
    retry_initial: float = DEFAULT_RETRY_INITIAL
    retry_max: float | None = None             # None: the configuration's renewal.retry_seconds, else 3600
    max_sleep: float = DEFAULT_MAX_SLEEP
    once: bool = False
    attest: bool = False                       # renew through the attested enrollment, not /sren


@dataclass
class Outcome:
    renewed: bool
    certificate: x509.Certificate
    threshold: timedelta
    threshold_source: str
    path: str | None = None                    # how this run last renewed: RENEW or ATTESTED


def backoff(attempt: int, initial: float, cap: float, rand: random.Random) -> tuple[float, float]:
    """(the ceiling, the wait) before retry `attempt` (1, 2, ...): full jitter, a uniform wait in
    [0, min(cap, initial * 2**(attempt - 1))]."""
    ceiling = min(cap, initial * 2 ** min(attempt - 1, 60))
    return ceiling, rand.uniform(0, ceiling)


def until_due(cert: x509.Certificate, threshold: timedelta, now: datetime) -> float:
    """Seconds until the certificate enters its threshold (0 or less: due now)."""
    return (cert.not_valid_after_utc - threshold - now).total_seconds()


def _event(event: str, level: int = logging.INFO, **fields) -> None:
    log.log(level, event, extra=fields)


def _cert_fields(cert: x509.Certificate, now: datetime) -> dict:
    return {"certificate_serial": format_serial(cert.serial_number),
            "not_after": cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
            "left_days": _days(cert.not_valid_after_utc - now)}


async def run(settings: AgentSettings, stop: asyncio.Event | None = None, *,
              clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
              rand: random.Random | None = None) -> Outcome:
    """Check and renew until `stop` is set (with `once`: one check, at most one renewal). The last
    check's outcome; AgentError if the bundle has no usable identity (or, with `attest`, no
    firmware.json); EnrollFailed if the device is revoked (the agent stops: nothing else can
    help), and with `once` if the renewal failed (nothing of the old identity lost)."""
    directory = Path(settings.directory)
    parse_gateway(settings.gateway)                 # a bad URI fails before anything else
    if settings.attest:
        try:
            if firmware_of(directory) is None:
                raise AgentError(f"--attest: no firmware.json in {directory} (the firmware the evidence claims)")
        except EnrollFailed as exc:
            raise AgentError(f"--attest: {exc.reason}") from None
    stop = stop or asyncio.Event()
    rand = rand or random.SystemRandom()
    threshold, source = threshold_of(directory, settings.renew_before)
    _event("agent-start", gateway=settings.gateway, device=str(directory), threshold_days=_days(threshold),
           threshold_source=source, once=settings.once, path=ATTESTED if settings.attest else RENEW)
    attempt, renewed, path = 0, False, None
    held_until: datetime | None = None      # a certificate due when issued: not renewed again before this
    while True:
        done = recover(directory)
        if done is not None:
            _event("agent-recovered", logging.WARNING, result=done)
        threshold, source = threshold_of(directory, settings.renew_before)
        cert = current_certificate(directory)
        now = clock()
        wait = until_due(cert, threshold, now)
        outcome = Outcome(renewed, cert, threshold, source, path)
        if wait <= 0 and held_until is not None and now < held_until:
            # the certificate just issued is inside the threshold already (a threshold longer than
            # the type's validity): renewing at once would only spend the device's certificate
            # quota; it is renewed when half of what it had left has passed
            _event("agent-check", logging.WARNING, result="due-after-renewal", threshold_days=_days(threshold),
                   threshold_source=source, renew_at=_iso(held_until), **_cert_fields(cert, now))
            wait = min((held_until - now).total_seconds(), settings.max_sleep)
            wait += rand.uniform(0, WAKE_JITTER * wait)
        elif wait > 0:
            _event("agent-check", result="not-due", threshold_days=_days(threshold), threshold_source=source,
                   **_cert_fields(cert, now))
            if settings.once:
                return outcome
            wait = min(wait, settings.max_sleep)
            wait += rand.uniform(0, WAKE_JITTER * wait)
            attempt, held_until = 0, None
        else:
            _event("agent-check", result="due", threshold_days=_days(threshold), threshold_source=source,
                   **_cert_fields(cert, now))
            try:
                new, config_problem, path, verdict = await _renew_by_path(directory, settings, cert, now)
            except EnrollFailed as exc:
                attempt += 1
                if refusal_of(exc) == "revoked":
                    _event("agent-revoked", logging.ERROR, step=exc.step, reason=exc.reason)
                    _event("agent-stop", renewed=renewed)
                    raise
                if settings.once:
                    _event("agent-renew-failed", logging.WARNING, step=exc.step, reason=exc.reason, attempt=attempt)
                    raise
                ceiling, wait = backoff(attempt, settings.retry_initial,
                                        retry_cap_of(directory, settings.retry_max), rand)
                _event("agent-renew-failed", logging.WARNING, step=exc.step, reason=exc.reason, attempt=attempt,
                       backoff_ceiling=round(ceiling, 3), retry_in=round(wait, 3))
            else:
                attempt, renewed = 0, True
                issued_at = clock()
                extra = {} if verdict is None else {"verdict": verdict}
                _event("agent-renewed", previous=format_serial(cert.serial_number), path=path, **extra,
                       **_cert_fields(new, issued_at))
                if config_problem is not None:
                    _event("agent-config-failed", logging.WARNING, reason=config_problem)
                if settings.once:
                    return Outcome(True, new, threshold, source, path)
                held_until = issued_at + (new.not_valid_after_utc - issued_at) / 2
                continue                            # check again: the new certificate's wake time
        if stop.is_set():
            break
        _event("agent-sleep", seconds=round(wait, 3), wake=_iso(clock() + timedelta(seconds=wait)))
        try:
            await asyncio.wait_for(stop.wait(), wait)
            break
        except asyncio.TimeoutError:
            pass
    _event("agent-stop", renewed=renewed)
    return outcome


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")
