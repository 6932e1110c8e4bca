"""The verification policy: a TOML file, per device type. Format in docs/attestation.md.

Every problem is reported as a `PolicyError` whose message names the file and the exact place
(`device_types.temperature-sensor.firmware[2].digest: ...`), so `devid attest policy check`
can print it as one line.
"""

from __future__ import annotations

import difflib
import enum
import re
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from .errors import PolicyError
from .evidence import HASH_ALGS

POLICY_VERSION = 1
# renew when the operational certificate has less than this left (the seed's 30 days), for a type
# whose table does not say
DEFAULT_RENEWAL_THRESHOLD = timedelta(days=30)
MAX_VALIDITY_DAYS = 3650                   # as devid.toml's profiles.operational_validity_days
_VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+){0,5}$")
_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
_DIGEST_LEN = {name: n for name, n in HASH_ALGS.values()}


class Tier(str, enum.Enum):
    """Trustworthiness tiers of the EAR draft (draft-ietf-rats-ear), from best to worst."""

    AFFIRMING = "affirming"
    WARNING = "warning"
    CONTRAINDICATED = "contraindicated"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Tier.AFFIRMING: 0, Tier.WARNING: 1, Tier.CONTRAINDICATED: 2}


def parse_version(text: str) -> tuple[int, ...]:
    """Dotted numeric version ("2.10.1") as a comparable tuple."""
    if not isinstance(text, str) or not _VERSION_RE.match(text):
        raise ValueError(f"version {text!r} is not dotted numbers like 2.3.1")
    return tuple(int(p) for p in text.split("."))


@dataclass(frozen=True)
class ReferenceValue:
    """One firmware image the fleet may run."""

    name: str                  # must equal the evidence's swname
    version: str               # must equal the evidence's swversion
    alg: str                   # sha-256 | sha-384 | sha-512
    digest: bytes
    deprecated: bool = False   # still accepted, with a warning

    @property
    def key(self) -> str:
        return f"{self.alg}:{self.digest.hex()}"


@dataclass(frozen=True)
class DeviceTypePolicy:
    device_type: str
    attestation: str = "required"              # required | waived (enrollment without evidence)
    accept: Tier = Tier.AFFIRMING              # the worst tier still accepted for enrollment
    revoke_on_contraindicated: bool = False
    secure_boot_required: bool = True
    debug_disabled_required: bool = True
    minimum_firmware_version: str | None = None
    firmware: tuple[ReferenceValue, ...] = ()
    reenroll: bool = True                      # an enrolled device may enroll again with its factory identity
    # the operational certificate's lifecycle: its validity (None: devid.toml's
    # profiles.operational_validity_days) and when the device renews it (told in its configuration)
    certificate_validity: timedelta | None = None
    renewal_threshold: timedelta = DEFAULT_RENEWAL_THRESHOLD
    _by_digest: dict = field(default_factory=dict, compare=False, repr=False)
    _below_minimum: set = field(default_factory=set, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_digest.update({rv.key: rv for rv in self.firmware})
        if self.minimum_firmware_version is not None:
            minimum = parse_version(self.minimum_firmware_version)
            self._below_minimum.update(rv.key for rv in self.firmware if parse_version(rv.version) < minimum)

    def below_minimum(self, ref: ReferenceValue) -> bool:
        """The reference value's version is below the minimum firmware version (precomputed)."""
        return ref.key in self._below_minimum

    def reference(self, fw_key: str) -> ReferenceValue | None:
        return self._by_digest.get(fw_key)

    def accepts(self, tier: Tier) -> bool:
        return tier.rank <= self.accept.rank


@dataclass(frozen=True)
class Policy:
    device_types: dict[str, DeviceTypePolicy]
    nonce_lifetime: timedelta = timedelta(seconds=60)
    verdict_window: timedelta = timedelta(seconds=300)
    max_clock_skew: timedelta = timedelta(seconds=300)
    oemid: int | None = None
    source: str = "<policy>"

    def for_type(self, device_type: str) -> DeviceTypePolicy | None:
        return self.device_types.get(device_type)

    def renewal_threshold(self, device_type: str) -> timedelta:
        """When a device of `device_type` renews: once its operational certificate has less than
        this left (`renewal_threshold_days`; 30 days for a type the policy does not list)."""
        t = self.device_types.get(device_type)
        return DEFAULT_RENEWAL_THRESHOLD if t is None else t.renewal_threshold

    def certificate_validity(self, device_type: str) -> timedelta | None:
        """The validity of an operational certificate for `device_type` (`certificate_validity_days`),
        or None: the CA's operational profile (devid.toml's profiles.operational_validity_days)."""
        t = self.device_types.get(device_type)
        return None if t is None else t.certificate_validity


# -- loading and validation -------------------------------------------------------------------------

_SETTINGS_KEYS = {"nonce_lifetime_seconds", "verdict_window_seconds", "max_clock_skew_seconds", "oemid"}
_TYPE_KEYS = {"attestation", "accept", "revoke_on_contraindicated", "secure_boot_required",
              "debug_disabled_required", "minimum_firmware_version", "firmware", "reenroll",
              "certificate_validity_days", "renewal_threshold_days"}
_FW_KEYS = {"name", "version", "digest", "deprecated"}


class _Checker:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, message: str) -> PolicyError:
        return PolicyError(f"{self.where}: {path}: {message}" if path else f"{self.where}: {message}")

    def keys(self, table: dict, allowed: set[str], path: str, required: tuple[str, ...] = ()) -> None:
        for k in table:
            if k not in allowed:
                close = difflib.get_close_matches(k, sorted(allowed), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(sorted(allowed))})"
                raise self.fail(f"{path}.{k}" if path else k, f"unknown key{hint}")
        for k in required:
            if k not in table:
                raise self.fail(path, f"missing required key '{k}'")

    def typed(self, table: dict, key: str, kind: type, path: str, default: Any) -> Any:
        if key not in table:
            return default
        v = table[key]
        if kind is int and (type(v) is not int):
            raise self.fail(f"{path}{key}", f"expected an integer, got {_tname(v)}")
        if kind is not int and not isinstance(v, kind):
            raise self.fail(f"{path}{key}", f"expected {_KIND_NAMES[kind]}, got {_tname(v)}")
        return v

    def choice(self, table: dict, key: str, choices: tuple[str, ...], path: str, default: str) -> str:
        v = self.typed(table, key, str, path, default)
        if v not in choices:
            raise self.fail(f"{path}{key}", f"expected one of {', '.join(repr(c) for c in choices)}, got {v!r}")
        return v

    def seconds(self, table: dict, key: str, default: int, lo: int, hi: int) -> timedelta:
        v = self.typed(table, key, int, "settings.", default)
        if not lo <= v <= hi:
            raise self.fail(f"settings.{key}", f"must be between {lo} and {hi} seconds, got {v}")
        return timedelta(seconds=v)


_KIND_NAMES = {str: "a string", bool: "true or false", list: "an array", dict: "a table"}


def _tname(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
            dict: "a table"}.get(type(v), type(v).__name__)


def parse_policy(text: str, where: str = "<policy>") -> Policy:
    c = _Checker(where)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise c.fail("", f"not valid TOML: {exc}") from None
    c.keys(doc, {"version", "settings", "device_types"}, "", required=("version", "device_types"))
    version = c.typed(doc, "version", int, "", None)
    if version != POLICY_VERSION:
        raise c.fail("version", f"this devid reads policy version {POLICY_VERSION}, not {version}")
    settings = c.typed(doc, "settings", dict, "", {})
    c.keys(settings, _SETTINGS_KEYS, "settings")
    nonce_lifetime = c.seconds(settings, "nonce_lifetime_seconds", 60, 5, 600)
    verdict_window = c.seconds(settings, "verdict_window_seconds", 300, 10, 86400)
    skew = c.seconds(settings, "max_clock_skew_seconds", 300, 0, 86400 * 366)
    oemid = c.typed(settings, "oemid", int, "settings.", None)
    if oemid is not None and oemid < 0:
        raise c.fail("settings.oemid", "must be an IANA Private Enterprise Number (>= 0)")

    types = c.typed(doc, "device_types", dict, "", {})
    if not types:
        raise c.fail("device_types", "no device type: add at least one [device_types.<type>] table")
    out: dict[str, DeviceTypePolicy] = {}
    for name, table in types.items():
        path = f"device_types.{name}"
        if not _TYPE_RE.match(name):
            raise c.fail(path, "device type must be 1-32 of a-z 0-9 . _ - (as in device certificates)")
        if not isinstance(table, dict):
            raise c.fail(path, f"expected a table, got {_tname(table)}")
        out[name] = _device_type(c, name, table, path + ".")
    return Policy(out, nonce_lifetime, verdict_window, skew, oemid, where)


def _device_type(c: _Checker, name: str, t: dict, path: str) -> DeviceTypePolicy:
    c.keys(t, _TYPE_KEYS, path[:-1])
    attestation = c.choice(t, "attestation", ("required", "waived"), path, "required")
    accept = Tier(c.choice(t, "accept", ("affirming", "warning"), path, "affirming"))
    revoke = c.typed(t, "revoke_on_contraindicated", bool, path, False)
    secure_boot = c.typed(t, "secure_boot_required", bool, path, True)
    debug = c.typed(t, "debug_disabled_required", bool, path, True)
    reenroll = c.typed(t, "reenroll", bool, path, True)
    validity = c.typed(t, "certificate_validity_days", int, path, None)
    if validity is not None and not 1 <= validity <= MAX_VALIDITY_DAYS:
        raise c.fail(f"{path}certificate_validity_days", f"must be between 1 and {MAX_VALIDITY_DAYS} days, got {validity}")
    threshold = c.typed(t, "renewal_threshold_days", int, path, DEFAULT_RENEWAL_THRESHOLD.days)
    if not 1 <= threshold <= MAX_VALIDITY_DAYS:
        raise c.fail(f"{path}renewal_threshold_days", f"must be between 1 and {MAX_VALIDITY_DAYS} days, got {threshold}")
    if validity is not None and threshold >= validity:
        raise c.fail(f"{path}renewal_threshold_days", f"{threshold} days is not less than certificate_validity_days "
                                                      f"({validity}): every certificate would be due at once")
    minimum = c.typed(t, "minimum_firmware_version", str, path, None)
    if minimum is not None:
        try:
            parse_version(minimum)
        except ValueError as exc:
            raise c.fail(f"{path}minimum_firmware_version", str(exc)) from None
    firmware = c.typed(t, "firmware", list, path, [])
    if attestation == "required" and not firmware:
        raise c.fail(f"{path}firmware", "attestation is required but no firmware reference value is listed "
                                        "(add [[" + path + "firmware]] entries)")
    refs: list[ReferenceValue] = []
    seen: dict[str, int] = {}
    for i, fw in enumerate(firmware):
        fpath = f"{path}firmware[{i + 1}]"
        if not isinstance(fw, dict):
            raise c.fail(fpath, f"expected a table, got {_tname(fw)}")
        c.keys(fw, _FW_KEYS, fpath, required=("name", "version", "digest"))
        fname = c.typed(fw, "name", str, fpath + ".", None)
        fversion = c.typed(fw, "version", str, fpath + ".", None)
        digest = c.typed(fw, "digest", str, fpath + ".", None)
        deprecated = c.typed(fw, "deprecated", bool, fpath + ".", False)
        if not fname:
            raise c.fail(f"{fpath}.name", "must not be empty")
        try:
            parse_version(fversion)
        except ValueError as exc:
            raise c.fail(f"{fpath}.version", str(exc)) from None
        alg, sep, hexdigest = digest.partition(":")
        if not sep or alg not in _DIGEST_LEN:
            raise c.fail(f"{fpath}.digest", "expected '<alg>:<hex>' with alg sha-256, sha-384 or sha-512, "
                                            f"got {digest[:20]!r}")
        want = _DIGEST_LEN[alg] * 2
        if len(hexdigest) != want or not re.fullmatch(r"[0-9a-fA-F]*", hexdigest):
            raise c.fail(f"{fpath}.digest", f"expected {want} hex digits for {alg}, got {len(hexdigest)} "
                                            "characters" + ("" if re.fullmatch(r"[0-9a-fA-F]*", hexdigest)
                                                            else " with non-hex ones"))
        rv = ReferenceValue(fname, fversion, alg, bytes.fromhex(hexdigest), deprecated)
        if rv.key in seen:
            raise c.fail(f"{fpath}.digest", f"same digest as firmware[{seen[rv.key]}]")
        seen[rv.key] = i + 1
        refs.append(rv)
    return DeviceTypePolicy(name, attestation, accept, revoke, secure_boot, debug, minimum, tuple(refs), reenroll,
                            None if validity is None else timedelta(days=validity), timedelta(days=threshold))


def load_policy(path: Path | str) -> Policy:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"{path}: policy file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: cannot read the policy: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_policy(text, str(path))
