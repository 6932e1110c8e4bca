"""The data directory: configuration, the CA's files, the registry database.

    DATA/devid.toml              configuration (organisation, OIDs, validity periods)
    DATA/registry.sqlite3        devices, certificates, CRL numbers (WAL)
    DATA/ca/                     mode 0700
        <name>.cert.pem          root, manufacturing, operational, gateway
        <name>.key.pem           encrypted PKCS#8, mode 0600
        gateway.chain.pem        gateway certificate + operational CA
        passphrase               generated CA passphrase, mode 0600 (only without DEVID_CA_PASSPHRASE)
    DATA/crl/<ca>.crl.pem        the latest CRLs written by `devid crl`
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import tomllib
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Iterable

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devid.attestation.log_budget import LogBudget
from devid.ca import keys
from devid.ca.authority import CertificateAuthority, Issuer
from devid.ca.errors import CAError, CAExists, CANotInitialised
from devid.ca.hierarchy import CA_NAMES, create_hierarchy
from devid.ca.identity import IdentitySettings
from devid.ca.profiles import default_profiles

from devid.gateway.service.budgets import ACTIONS, Budgets, Rate
from devid.gateway.dtls.limits import LimitError, ServerLimits
from devid.gateway.errors import ConfigError, DirectoryBusy
from devid.gateway.system.fs import directory_lock, fsync_path, write_atomic
from devid.gateway.store.registry import SQLiteRegistry

ENV_DATA = "DEVID_DATA"
ENV_PASSPHRASE = "DEVID_CA_PASSPHRASE"
DEFAULT_DATA = "devid-data"
CERT_NAMES = (*CA_NAMES, "gateway")
INIT_WAIT = 30.0        # s a second `devid init` waits for the first one's lock on the data directory


def resolve_data_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get(ENV_DATA) or DEFAULT_DATA)


CONFIG_TEMPLATE = """\
# devid configuration, written by `devid init`. Names and OIDs here end up in every certificate.

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
"""


@dataclass(frozen=True)
class Config:
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    factory_days: int = 7300
    operational_days: int = 90
    crl_days: int = 7
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
        return CONFIG_TEMPLATE.format(organization_line=organization_line, pen=s.pen,
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
}


class DataDir:
    """One devid data directory. Keys are decrypted lazily, once, when first needed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.ca_dir = self.path / "ca"
        self.crl_dir = self.path / "crl"
        self.config_path = self.path / "devid.toml"
        self.db_path = self.path / "registry.sqlite3"
        self._config: Config | None = None
        self._issuers: dict[str, Issuer] = {}
        self._passphrase: bytes | None = None

    # -- paths -----------------------------------------------------------------------------

    def cert_path(self, name: str) -> Path:
        return self.ca_dir / f"{name}.cert.pem"

    def key_path(self, name: str) -> Path:
        return self.ca_dir / f"{name}.key.pem"

    @property
    def secret_path(self) -> Path:
        return self.ca_dir / "passphrase"

    @property
    def gateway_chain_path(self) -> Path:
        return self.ca_dir / "gateway.chain.pem"

    def exists(self) -> bool:
        return self.cert_path("root").exists()

    # -- opening -----------------------------------------------------------------------------

    def require(self) -> "DataDir":
        """Check that a CA exists here, that no secret file is readable by others and that
        devid.toml is valid (every command that uses the data directory stops on a bad value)."""
        if not self.path.is_dir():
            raise CANotInitialised(f"data directory {self.path} does not exist: run 'devid init --data {self.path}'")
        if not self.exists():
            raise CANotInitialised(f"no CA in {self.path}: run 'devid init --data {self.path}'")
        for name in CERT_NAMES:
            keys.check_private_file(self.key_path(name))
        if self.secret_path.exists():
            keys.check_private_file(self.secret_path)
        self.config
        return self

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                text = self.config_path.read_text()
            except FileNotFoundError:
                self._config = Config()
                return self._config
            except OSError as exc:
                raise ConfigError(f"{self.config_path}: {exc.strerror}") from None
            self._config = Config.parse(text, str(self.config_path))
        return self._config

    def open_registry(self, *, readonly: bool = False) -> SQLiteRegistry:
        """The registry `devid init` made here: missing or empty is an error naming the file (a
        new empty registry would re-issue serials already in the field). `readonly`: for commands
        that only read; works on a read-only data directory."""
        return SQLiteRegistry(self.db_path, create=False, readonly=readonly)

    def passphrase(self) -> bytes:
        if self._passphrase is None:
            env = os.environ.get(ENV_PASSPHRASE)
            if env:
                self._passphrase = env.encode()
            elif self.secret_path.exists():
                keys.check_private_file(self.secret_path)
                self._passphrase = self.secret_path.read_bytes().strip()
            else:
                raise keys.KeyFileError(f"no CA passphrase: set {ENV_PASSPHRASE} (no {self.secret_path})")
        return self._passphrase

    def cert(self, name: str) -> x509.Certificate:
        path = self.cert_path(name)
        try:
            return x509.load_pem_x509_certificate(path.read_bytes())
        except FileNotFoundError:
            raise CANotInitialised(f"{path}: missing") from None
        except ValueError as exc:
            raise CAError(f"{path}: not a PEM certificate ({exc})") from None

    def cert_pem(self, name: str) -> bytes:
        return self.cert(name).public_bytes(serialization.Encoding.PEM)

    def issuer(self, name: str) -> Issuer:
        if name not in self._issuers:
            key = keys.load_encrypted_key(self.key_path(name), self.passphrase())
            cert = self.cert(name)
            if key.public_key() != cert.public_key():
                raise keys.KeyFileError(f"{self.key_path(name)} does not match {self.cert_path(name)}")
            self._issuers[name] = Issuer(name, cert, key)
        return self._issuers[name]

    def authority(self, registry: SQLiteRegistry, rand_bytes=os.urandom) -> CertificateAuthority:
        cfg = self.config
        return CertificateAuthority(self.issuer, default_profiles(cfg.factory_days, cfg.operational_days),
                                    cfg.identity, registry, rand_bytes=rand_bytes)

    # -- init --------------------------------------------------------------------------------

    def init(self, now: datetime, hostnames: Iterable[str] = (), organization: str | None = None,
             rand_bytes=os.urandom) -> None:
        """Create the CA hierarchy, the config and the registry. Never overwrites an existing CA.

        Everything is built in a private temporary directory, recorded in the registry (a durable
        commit), then renamed into place in one step: a crash leaves either no CA or a complete
        one, recorded. The files are fsynced before the rename and the data directory after it,
        so the same holds after a power cut. Two inits at once: the second waits (up to INIT_WAIT s, an init takes about
        a second) for the lock the first holds on the data directory, then finds its CA and
        refuses; waiting rather than refusing at once gives the true answer, "a CA already
        exists", instead of a transient one.
        """
        if self.exists() or self.ca_dir.exists():
            raise CAExists(f"a CA already exists in {self.path}: refusing to overwrite it")
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            with directory_lock(self.path, wait=INIT_WAIT):
                self._init_locked(now, hostnames, organization, rand_bytes)
        except DirectoryBusy as exc:
            who = f"pid {exc.pid}" if exc.pid else "another process"
            raise CAExists(f"another devid init ({who}) is still running in {self.path}") from None

    def _init_locked(self, now: datetime, hostnames: Iterable[str], organization: str | None,
                     rand_bytes) -> None:
        if self.exists() or self.ca_dir.exists():
            raise CAExists(f"a CA already exists in {self.path}: refusing to overwrite it")
        if not self.config_path.exists():
            cfg = Config()
            if organization:
                cfg = Config(IdentitySettings(organization=organization))
            write_atomic(self.config_path, cfg.render().encode())
        for stale in self.path.glob(".ca-init-*"):    # keys of an init that was killed (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        cfg = self.config
        hierarchy = create_hierarchy(cfg.identity, hostnames, now, rand_bytes)
        staging = self.path / f".ca-init-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir(mode=0o700)
        try:
            passphrase = os.environ.get(ENV_PASSPHRASE, "").encode()
            chosen = bool(passphrase)           # a person's passphrase is stretched (ca/keys.py)
            if not chosen:
                passphrase = secrets.token_urlsafe(32).encode()
                keys.write_private_file(staging / "passphrase", passphrase + b"\n")
            for name, key in hierarchy.keys.items():
                keys.write_private_file(staging / f"{name}.key.pem", keys.encrypt_key(key, passphrase, stretch=chosen))
                (staging / f"{name}.cert.pem").write_bytes(
                    hierarchy.certs[name].public_bytes(serialization.Encoding.PEM))
            (staging / "gateway.chain.pem").write_bytes(
                b"".join(hierarchy.certs[n].public_bytes(serialization.Encoding.PEM)
                         for n in ("gateway", "operational")))
            for entry in staging.iterdir():         # on disk before the CA is recorded and renamed
                fsync_path(entry)
            fsync_path(staging)

            def move_into_place() -> None:
                try:
                    os.rename(staging, self.ca_dir)   # atomic; fails if another init won the race
                except OSError:
                    raise CAExists(f"a CA already exists in {self.path}: refusing to overwrite it") from None
                fsync_path(self.path)

            # recorded (durably) first, renamed into place second: a crash between the two leaves no
            # CA here (only certificate rows of a CA nobody has, which a new init does not mind)
            registry = SQLiteRegistry(self.db_path, create=True)
            try:
                registry.record_certificates(hierarchy.records)
            finally:
                registry.close()
            move_into_place()
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
