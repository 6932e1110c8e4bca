"""devid.toml: its schema, its strict parsing and the Config it becomes.

An unknown section or key (a typo), a value of the wrong type or out of its range is one
ConfigError naming the file, the key and the allowed values. Scalar sections are checked key
by key (`_SCHEMA`); the sections that are one object each ([gateway], [budgets],
[attestation_log]) are checked by building their dataclass (`_OBJECT_SECTIONS`).
"""

from __future__ import annotations

import math
import tomllib
import unicodedata
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Callable

import tomli_w
from cryptography import x509

from devid.attestation.log_budget import LogBudget
from devid.ca.identity import IdentitySettings

from devid.gateway.service.budgets import ACTIONS, Budgets, Rate
from devid.gateway.dtls.limits import LimitError, ServerLimits
from devid.gateway.errors import ConfigError

CONFIG_HEADER = "# devid configuration, written by `devid init`."
CONFIG_TEMPLATE = CONFIG_HEADER + """ Names and OIDs here end up in every certificate.

[organization]
{organization_line}
# IANA Private Enterprise Number: used in device URNs (urn:dev:os:<pen>-<serial>)
pen = {pen}

[identity]
# private extension carrying the device type (UTF8String, non-critical)
device_type_oid = "{device_type_oid}"
# hwType of the RFC 4108 hardwareModuleName in each device certificate's SubjectAltName
hardware_type_oid = "{hardware_type_oid}"

[profiles]
factory_validity_days = {factory_days}
operational_validity_days = {operational_days}

[crl]
validity_days = {crl_days}
{ca_section}"""


@dataclass(frozen=True)
class Config:
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    factory_days: int = 7300
    operational_days: int = 90
    crl_days: int = 7
    # [ca] passphrase_file: where the CA passphrase is kept, when not in DATA/ca/passphrase
    passphrase_file: str | None = None
    # [registry] url: a PostgreSQL registry (docs/scale-out.md); None: SQLite in the data directory
    registry_url: str | None = None
    # [registry] password_file: the registry's password, mode 0600 (else the URL's user has none,
    # or libpq's environment gives it)
    registry_password_file: str | None = None
    # [gateway] as written (checked): the DTLS server's limits; serve flags override them key by key
    gateway: dict = field(default_factory=dict)

    # [budgets] as written (checked): per-device limits of the enrollment service
    budgets_table: dict = field(default_factory=dict)

    @property
    def server_limits(self) -> ServerLimits:
        return ServerLimits(**self.gateway)

    # [attestation_log] as written (checked): refused evidence logged in full per device
    log_table: dict = field(default_factory=dict)

    @property
    def budgets(self) -> Budgets:
        return Budgets(**_budgets_from_toml(self.budgets_table))

    @property
    def log_budget(self) -> LogBudget:
        return LogBudget(**_log_budget_from_toml(self.log_table))

    def render(self) -> str:
        s = self.identity
        # values are written by tomli-w (quotes and backslashes in a name escaped as TOML wants), the
        # comments around them by the template
        organization_line = tomli_w.dumps({"name": s.organization}).strip()
        ca_section = ""
        if self.passphrase_file:
            ca_section = ("\n[ca]\n# the CA passphrase, mode 0600 (devid init --passphrase-file)\n"
                          + tomli_w.dumps({"passphrase_file": self.passphrase_file}))
        if self.registry_url:
            ca_section += ("\n[registry]\n# the shared registry of every gateway host (docs/scale-out.md); no password here\n"
                           + tomli_w.dumps({"url": self.registry_url}))
            if self.registry_password_file:
                ca_section += tomli_w.dumps({"password_file": self.registry_password_file})
        return CONFIG_TEMPLATE.format(organization_line=organization_line, pen=s.pen, ca_section=ca_section,
                                      device_type_oid=s.device_type_oid, hardware_type_oid=s.hardware_type_oid,
                                      factory_days=self.factory_days, operational_days=self.operational_days,
                                      crl_days=self.crl_days)

    @classmethod
    def parse(cls, text: str, where: str) -> "Config":
        """devid.toml, strictly: an unknown section or key (a typo), a value of the wrong type or
        out of its range is one error naming the file, the key and the allowed values."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
        known = [*_SCHEMA, *_OBJECT_SECTIONS]
        unknown = sorted(set(doc) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown section or key [{unknown[0]}] (known: {', '.join(known)})")
        values: dict[str, object] = {}
        for section, checks in _SCHEMA.items():
            table = doc.get(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: [{section}] must be a table")
            extra = sorted(set(table) - set(checks))
            if extra:
                raise ConfigError(f"{where}: unknown key {section}.{extra[0]} (known: {', '.join(checks)})")
            for key, check in checks.items():
                if key in table:
                    try:
                        values[f"{section}.{key}"] = check(table[key])
                    except ValueError as exc:
                        raise ConfigError(f"{where}: {section}.{key}: {exc}") from None
        objects = {}
        for section, (cls_, convert) in _OBJECT_SECTIONS.items():
            table = doc.get(section)
            if table is not None:
                _build(section, cls_, table, where, convert)        # checked now, used later
                objects[section] = dict(table)
        defaults = IdentitySettings()
        identity = IdentitySettings(
            organization=values.get("organization.name", defaults.organization),
            pen=values.get("organization.pen", defaults.pen),
            device_type_oid=values.get("identity.device_type_oid", defaults.device_type_oid),
            hardware_type_oid=values.get("identity.hardware_type_oid", defaults.hardware_type_oid))
        return cls(identity, values.get("profiles.factory_validity_days", cls.factory_days),
                   values.get("profiles.operational_validity_days", cls.operational_days),
                   values.get("crl.validity_days", cls.crl_days),
                   passphrase_file=values.get("ca.passphrase_file"),
                   registry_url=values.get("registry.url"),
                   registry_password_file=values.get("registry.password_file"),
                   gateway=objects.get("gateway", {}), budgets_table=objects.get("budgets", {}),
                   log_table=objects.get("attestation_log", {}))


def _integer(low: int, high: int, what: str = "") -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be an integer from {low:,} to {high:,}{what} (got {value!r})")
        return value
    return check


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string (got {value!r})")
    return value


# RFC 5280 ub-organization-name: an organizationName of at most 64 characters
MAX_ORGANIZATION = 64


def check_organization(value: object) -> str:
    """An organisation name for every certificate subject: 1 to 64 characters (RFC 5280's upper
    bound), no control characters, no leading or trailing blanks. Quotes, backslashes, commas and
    any other printable character are kept exactly as given (devid.toml and the certificates
    escape them as their formats require)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string (got {value!r})")
    if value != value.strip():
        raise ValueError(f"must not begin or end with blanks (got {value!r})")
    if len(value) > MAX_ORGANIZATION:
        raise ValueError(f"must be at most {MAX_ORGANIZATION} characters, the limit of a certificate's "
                         f"organizationName (got {len(value)})")
    if any(unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") for ch in value):
        raise ValueError(f"must not contain control characters or line breaks (got {value!r})")
    return value


def _absolute_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"must be an absolute path (got {value!r})")
    return value


def check_registry_url(value: object) -> str:
    """A PostgreSQL URL for devid.toml: postgresql://USER@HOST:PORT/DB, with no password in it (a
    file anyone may read is no place for one: [registry] password_file, or libpq's environment)."""
    from urllib.parse import parse_qs, urlsplit
    if not isinstance(value, str) or not value.lower().startswith(("postgresql://", "postgres://")):
        raise ValueError("must be a PostgreSQL URL, postgresql://USER@HOST:PORT/DATABASE")
    try:
        parts = urlsplit(value)
        parts.port
    except ValueError:
        raise ValueError("must be a PostgreSQL URL, postgresql://USER@HOST:PORT/DATABASE") from None
    try:
        import psycopg
        params = psycopg.conninfo.conninfo_to_dict(value)       # as libpq reads it ('#', '?' in a password)
    except Exception:
        raise ValueError("must be a PostgreSQL URL, postgresql://USER@HOST:PORT/DATABASE") from None
    if parts.password is not None or any(k.lower().endswith(("password", "secret"))
                                         for k in (*params, *parse_qs(parts.query))):
        raise ValueError("must not hold a password: put it in a file of mode 0600 named by [registry] "
                         "password_file (devid init --registry-password-file), or in libpq's environment "
                         "(PGPASSFILE, PGPASSWORD)")
    return value


def _oid(value: object) -> str:
    try:
        x509.ObjectIdentifier(_text(value))
    except ValueError:
        raise ValueError(f"must be a dotted object identifier such as 1.3.6.1.4.1.99999.1 (got {value!r})") from None
    return value


def _build(section: str, cls_: type, table: object, where: str, convert: Callable[[dict], dict] | None):
    """A section that is one dataclass (its fields are the keys; the class checks the values)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{section}] must be a table")
    names = [f.name for f in fields(cls_)]
    extra = sorted(set(table) - set(names))
    if extra:
        raise ConfigError(f"{where}: unknown key {section}.{extra[0]} (known: {', '.join(names)})")
    try:
        return cls_(**(convert(table) if convert else table))
    except LimitError as exc:
        raise ConfigError(f"{where}: {section}.{exc.field} must be {exc.allowed} (got {exc.value!r})") from None
    except (ValueError, TypeError, OverflowError) as exc:
        text = str(exc)
        raise ConfigError(f"{where}: {text}" if text.startswith(f"{section}.") else f"{where}: [{section}]: {text}") \
            from None


def _budgets_from_toml(table: dict) -> dict:
    """[budgets]: rates as tables {burst, interval}, windows and grace periods in seconds."""
    out = dict(table)
    for name, value in table.items():
        if name in ACTIONS:
            if not isinstance(value, dict) or set(value) - {"burst", "interval"}:
                raise ValueError(f"budgets.{name} must be a table {{burst = N, interval = SECONDS}} (got {value!r})")
            default = Budgets().rate(name)
            try:
                out[name] = Rate(value.get("burst", default.burst), value.get("interval", default.interval))
            except ValueError as exc:
                raise ValueError(f"budgets.{name}.{exc}") from None
        elif name in ("certificate_window", "superseded_grace"):
            out[name] = _seconds(f"budgets.{name}", value)
    return out


def _log_budget_from_toml(table: dict) -> dict:
    """[attestation_log]: the window in seconds (LogBudget checks the ranges)."""
    out = dict(table)
    if "window" in table:
        out["window"] = _seconds("attestation_log.window", table["window"])
    return out


def _seconds(key: str, value: object) -> timedelta:
    """A TOML number of seconds as a timedelta (its range is the dataclass's to check)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{key} must be a finite number of seconds (got {value!r})")
    try:
        return timedelta(seconds=value)
    except OverflowError:
        raise ValueError(f"{key} must be a number of seconds of at most a few years (got {value!r})") from None


# devid.toml sections that are one object each: section -> (dataclass, conversion of the TOML table)
_OBJECT_SECTIONS: dict[str, tuple[type, Callable[[dict], dict] | None]] = {
    "gateway": (ServerLimits, None),
    "budgets": (Budgets, _budgets_from_toml),     # docs/enrollment.md#budgets
    "attestation_log": (LogBudget, _log_budget_from_toml),    # docs/attestation.md
}

# devid.toml: section -> key -> check (returns the value or raises ValueError saying what is allowed)
_SCHEMA: dict[str, dict[str, Callable[[object], object]]] = {
    "organization": {"name": _text, "pen": _integer(1, 2**32 - 1)},
    "identity": {"device_type_oid": _oid, "hardware_type_oid": _oid},
    "profiles": {
        # beyond the issuing CA's own validity (25 years for the intermediates) a certificate ends with its CA
        "factory_validity_days": _integer(1, 36500),
        "operational_validity_days": _integer(1, 3650),
    },
    "crl": {"validity_days": _integer(1, 366)},
    "ca": {"passphrase_file": _absolute_path},
    "registry": {"url": check_registry_url, "password_file": _absolute_path},
}
