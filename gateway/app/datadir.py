"""The data directory: configuration, the CA's files, the registry database.

    DATA/devid.toml              configuration (organisation, OIDs, validity periods; [registry] url)
    DATA/registry.sqlite3        devices, certificates, CRL numbers (WAL): the embedded default,
                                 unless the registry is on PostgreSQL (--registry URL,
                                 $DEVID_REGISTRY, devid.toml [registry] url: docs/scale-out.md)
    DATA/ca/                     mode 0700
        <name>.cert.pem          root, manufacturing, operational, gateway
        <name>.key.pem           encrypted PKCS#8, mode 0600
        <name>.key.pkcs11        instead of root, manufacturing and operational's .key.pem when the CA
                                 keys are in a PKCS#11 token (devid init --pkcs11): the key's URI
        gateway.chain.pem        gateway certificate + operational CA
        psk.secret               the PSK secret (ca/psk.py), sealed with the CA passphrase, mode 0600:
                                 made by the first `devid provision --psk`
        passphrase               generated CA passphrase, mode 0600 (only without DEVID_CA_PASSPHRASE
                                 or [ca] passphrase_file, devid init --passphrase-file)
    DATA/crl/<ca>.crl.pem        the latest CRLs written by `devid crl`

devid.toml's schema and parsing are in gateway/app/settings.py.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devid.ca import keys, psk
from devid.ca.authority import CertificateAuthority, Issuer
from devid.ca.errors import CAError, CAExists, CANotInitialised
from devid.ca.hierarchy import CA_NAMES, create_hierarchy
from devid.ca.identity import IdentitySettings
from devid.ca.profiles import default_profiles

from devid.gateway.app import ca_keys
from devid.gateway.app.settings import CONFIG_HEADER, Config, check_organization, check_registry_url
from devid.gateway.errors import ConfigError, DirectoryBusy, RegistryError
from devid.gateway.store.storage import StorageError
from devid.gateway.system.fs import directory_lock, fsync_path, write_atomic
from devid.gateway.store.engines import Registry, is_postgres_url, open_registry, redact

ENV_REGISTRY = "DEVID_REGISTRY"

ENV_DATA = "DEVID_DATA"
ENV_PASSPHRASE = "DEVID_CA_PASSPHRASE"
DEFAULT_DATA = "devid-data"
CERT_NAMES = (*CA_NAMES, "gateway")
CONFIG_MARK = "devid.toml.sha256"      # in an init's staging directory: the devid.toml it wrote
INIT_WAIT = 30.0        # s a second `devid init` waits for the first one's lock on the data directory


def _remove_if_empty(path: Path) -> None:
    """A directory this process made, after it failed: only if empty, so nothing of anyone else's goes."""
    try:
        path.rmdir()
    except OSError:
        pass


def resolve_data_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get(ENV_DATA) or DEFAULT_DATA)


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

    def key_ref_path(self, name: str) -> Path:
        """The reference to a CA key in a PKCS#11 token (gateway/app/ca_keys.py)."""
        return self.ca_dir / f"{name}{ca_keys.REF_SUFFIX}"

    def in_token(self, name: str) -> bool:
        return self.key_ref_path(name).exists()

    @property
    def secret_path(self) -> Path:
        """Where the CA passphrase is kept: [ca] passphrase_file, or DATA/ca/passphrase."""
        configured = self.config.passphrase_file
        return Path(configured) if configured else self.ca_dir / "passphrase"

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
            keys.check_private_file(self.key_ref_path(name) if self.in_token(name) else self.key_path(name))
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

    @property
    def registry_location(self) -> str | Path:
        """Where the registry is: $DEVID_REGISTRY (also what `--registry URL` sets for the
        command), else devid.toml's [registry] url, else DATA/registry.sqlite3."""
        env = os.environ.get(ENV_REGISTRY)
        if env:
            if not is_postgres_url(env):
                raise ConfigError(f"${ENV_REGISTRY} / --registry: not a PostgreSQL URL "
                                  "(postgresql://USER@HOST:PORT/DATABASE); leave it unset for SQLite in the data "
                                  "directory")
            return env
        return self.config.registry_url or self.db_path

    @property
    def registry_name(self) -> str:
        """The registry's location for messages and JSON: a path, or the URL without its password."""
        location = self.registry_location
        return redact(location) if isinstance(location, str) else str(location)

    def registry_password(self) -> str | None:
        """The password in devid.toml's [registry] password_file (mode 0600), if one is named;
        else None (libpq's environment, PGPASSWORD or PGPASSFILE, may still give one)."""
        name = self.config.registry_password_file
        if not name:
            return None
        path = Path(name)
        keys.check_private_file(path)
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"[registry] password_file {path}: {exc.strerror}") from None

    def open_registry(self, *, readonly: bool = False) -> Registry:
        """The registry `devid init` made: missing or empty is an error naming it (a new empty
        registry would re-issue serials already in the field). `readonly`: for commands that
        only read; on SQLite works on a read-only data directory."""
        return open_registry(self.registry_location, create=False, readonly=readonly,
                             password=self.registry_password())

    def passphrase(self) -> bytes:
        if self._passphrase is None:
            env = os.environ.get(ENV_PASSPHRASE)
            if env:
                self._passphrase = env.encode()
            elif self.secret_path.exists():
                keys.check_private_file(self.secret_path)
                try:
                    self._passphrase = self.secret_path.read_bytes().strip()
                except OSError as exc:
                    raise keys.KeyFileError(f"{self.secret_path}: {exc.strerror}") from None
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
            cert = self.cert(name)
            if self.in_token(name):
                self._issuers[name] = Issuer(name, cert, ca_keys.load_token_key(self.key_ref_path(name), cert))
                return self._issuers[name]
            key = keys.load_encrypted_key(self.key_path(name), self.passphrase())
            if key.public_key() != cert.public_key():
                raise keys.KeyFileError(f"{self.key_path(name)} does not match {self.cert_path(name)}")
            self._issuers[name] = Issuer(name, cert, key)
        return self._issuers[name]

    def psk_secret(self, create: bool = False, registry: Registry | None = None) -> bytes | None:
        """The PSK secret (ca/psk.py), None if there is none yet; `create`: made if missing.
        With `registry`: every host of one registry must derive the same PSKs, so the registry
        keeps a check of the secret (psk.secret_check, recorded by the first host that uses one);
        a host whose secret is another refuses it (CAError), and one without a secret makes none
        when the registry already has one (it must be copied: `devid init --join` does)."""
        path = self.ca_dir / psk.SECRET_FILE
        check = registry.deployment().get(psk.SECRET_CHECK_KEY) if registry is not None else None
        if create and check is not None and not path.exists():
            raise CAError(f"{path}: missing, and this registry's PSK devices use a PSK secret made on another host: "
                          "copy that host's DATA/ca/psk.secret here (devid init --join copies it)")
        if create:
            secret = psk.ensure_secret(path, self.passphrase())
        else:
            secret = psk.load_secret(path, self.passphrase()) if path.exists() else None
        if secret is not None and registry is not None:
            mine = psk.secret_check(secret)
            if (check or registry.settle_deployment(psk.SECRET_CHECK_KEY, mine)) != mine:
                raise CAError(f"{path} is not the PSK secret of this registry's devices (another host made its own): "
                              "copy the first host's DATA/ca/psk.secret here")
        return secret

    def authority(self, registry: Registry, rand_bytes=os.urandom) -> CertificateAuthority:
        cfg = self.config
        return CertificateAuthority(self.issuer, default_profiles(cfg.factory_days, cfg.operational_days),
                                    cfg.identity, registry, rand_bytes=rand_bytes)

    # -- init --------------------------------------------------------------------------------

    def init(self, now: datetime, hostnames: Iterable[str] = (), organization: str | None = None,
             rand_bytes=os.urandom, passphrase_file: Path | None = None,
             registry_password_file: Path | None = None, pkcs11: str | None = None) -> None:
        """Create the CA hierarchy, the config and the registry. Never overwrites an existing CA.

        Everything is built in a private temporary directory, recorded in the registry (a durable
        commit), then renamed into place in one step: a crash leaves either no CA or a complete
        one, recorded. `passphrase_file`: the CA passphrase is kept there, outside the data
        directory (read if it exists: a person's passphrase; else generated into it), and devid.toml
        says so. The files are fsynced before the rename and the data directory after it,
        so the same holds after a power cut. Two inits at once: the second waits (up to INIT_WAIT s, an init takes about
        a second) for the lock the first holds on the data directory, then finds its CA and
        refuses; waiting rather than refusing at once gives the true answer, "a CA already
        exists", instead of a transient one.

        `pkcs11`: a PKCS#11 URI naming a token: the three CA keys are generated in it and never
        leave it (gateway/app/ca_keys.py); the gateway's DTLS key is a file as always.

        A failed init leaves nothing a later one trips over: on an error it removes what it made
        (devid.toml, the registry, a generated passphrase file, the data directory itself when
        it made it and it is empty again). devid.toml is written last, just before the rename; a
        process killed between the two leaves the digest of the devid.toml it wrote in its
        staging directory, and the next init takes that file as its own leftover and replaces it
        (an operator's devid.toml, written before init, is kept and used).
        """
        if self.exists() or self.ca_dir.exists():
            raise CAExists(f"a CA already exists in {self.path}: refusing to overwrite it")
        token = ca_keys.token_for_init(pkcs11) if pkcs11 is not None else None
        made_dir = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            with directory_lock(self.path, wait=INIT_WAIT):
                self._init_locked(now, hostnames, organization, rand_bytes, passphrase_file, registry_password_file,
                                  token)
        except DirectoryBusy as exc:
            who = f"pid {exc.pid}" if exc.pid else "another process"
            raise CAExists(f"another devid init ({who}) is still running in {self.path}") from None
        except BaseException:
            if made_dir:
                _remove_if_empty(self.path)
            raise

    def _leftover_config(self) -> bool:
        """Is devid.toml (no CA here) the one an interrupted init wrote: its digest in that init's
        staging directory, or (an older devid's init) its header on a file that is not even TOML?"""
        try:
            text = self.config_path.read_bytes()
        except OSError:
            return False
        if text.startswith(CONFIG_HEADER.encode()):
            try:
                tomllib.loads(text.decode())
            except (UnicodeDecodeError, tomllib.TOMLDecodeError):
                return True
        digest = hashlib.sha256(text).hexdigest()
        for stale in self.path.glob(".ca-init-*"):
            try:
                if (stale / CONFIG_MARK).read_text().strip() == digest:
                    return True
            except OSError:
                continue
        return False

    def _init_config(self, organization: str | None, passphrase_file: Path | None,
                     registry_password_file: Path | None = None) -> bytes | None:
        """The Config this init uses (set as self.config), and devid.toml's text when this init
        writes the file (None: an operator's devid.toml is there, and kept)."""
        if passphrase_file is not None:
            if os.environ.get(ENV_PASSPHRASE):
                raise ConfigError(f"--passphrase-file and ${ENV_PASSPHRASE} name two passphrases: give one")
            if passphrase_file.resolve() == self.path.resolve() or self.path.resolve() in passphrase_file.resolve().parents:
                raise ConfigError(f"--passphrase-file {passphrase_file}: keep it outside the data directory "
                                  f"(without the flag it is generated into {self.ca_dir / 'passphrase'})")
        text = None
        if not self.config_path.exists() or self._leftover_config():
            if organization is not None:
                try:
                    check_organization(organization)
                except ValueError as exc:
                    raise ConfigError(f"--org: {exc}") from None
            url = os.environ.get(ENV_REGISTRY) or None
            if url is not None:
                try:
                    check_registry_url(url)
                except ValueError as exc:
                    raise ConfigError(f"--registry / ${ENV_REGISTRY}: {redact(url)} {exc}") from None
            elif registry_password_file is not None:
                raise ConfigError("--registry-password-file is for a PostgreSQL registry: give --registry URL too")
            self._config = Config(IdentitySettings(organization=organization) if organization else IdentitySettings(),
                                  passphrase_file=str(passphrase_file) if passphrase_file else None,
                                  registry_url=url,
                                  registry_password_file=str(Path(os.path.abspath(registry_password_file)))
                                  if registry_password_file else None)
            text = self._config.render().encode()
        else:
            self._config = None
            cfg = self.config                       # the operator's file, checked
            try:
                check_organization(cfg.identity.organization)
            except ValueError as exc:
                raise ConfigError(f"{self.config_path}: organization.name: {exc}") from None
            if organization is not None and organization != cfg.identity.organization:
                raise ConfigError(f"{self.config_path} exists and sets organization.name = "
                                  f"{cfg.identity.organization!r}: edit it there, or leave out --org")
            if passphrase_file is not None and cfg.passphrase_file != str(passphrase_file):
                raise ConfigError(f"{self.config_path} exists: set [ca] passphrase_file = \"{passphrase_file}\" "
                                  f"there to keep the passphrase in that file")
        return text

    def _init_locked(self, now: datetime, hostnames: Iterable[str], organization: str | None,
                     rand_bytes, passphrase_file: Path | None, registry_password_file: Path | None = None,
                     token=None) -> None:
        if self.exists() or self.ca_dir.exists():
            raise CAExists(f"a CA already exists in {self.path}: refusing to overwrite it")
        if passphrase_file is not None:
            passphrase_file = Path(os.path.abspath(passphrase_file))
        config_text = self._init_config(organization, passphrase_file, registry_password_file)
        if not isinstance(self.registry_location, Path):
            self._forget_interrupted()      # before its staging directory, the only copy of its keys, goes
        for stale in self.path.glob(".ca-init-*"):    # keys of an init that was killed (we hold the lock)
            if ca_keys.destroy_staged(stale):         # (kept while a key it names cannot be destroyed)
                shutil.rmtree(stale, ignore_errors=True)
        cfg = self.config
        staging = self.path / f".ca-init-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir(mode=0o700)
        fsync_path(self.path)           # its name on disk before a key it will name is made
        # a token key's reference is in the staging directory (fsynced) before the key is made
        maker = ca_keys.TokenKeyMaker(token, staging) if token is not None else None
        try:
            hierarchy = create_hierarchy(cfg.identity, hostnames, now, rand_bytes,
                                         **({"make_ca_key": maker} if maker else {}))
        except BaseException:
            if maker is None or maker.undo():
                shutil.rmtree(staging, ignore_errors=True)
            raise
        location = self.registry_location
        shared = not isinstance(location, Path)     # PostgreSQL: other hosts may join it later
        had_registry = shared or self.db_path.exists()
        generated: Path | None = None               # a passphrase file outside the data directory made here
        try:
            if config_text is not None:             # the mark that devid.toml, once written, is this init's
                (staging / CONFIG_MARK).write_text(hashlib.sha256(config_text).hexdigest() + "\n")
            passphrase = os.environ.get(ENV_PASSPHRASE, "").encode()
            outside = cfg.passphrase_file
            if not passphrase and outside and Path(outside).exists():
                passphrase = self.passphrase()
                if not passphrase:
                    raise keys.KeyFileError(f"{outside}: empty passphrase file")
            chosen = bool(passphrase)           # a person's passphrase is stretched (ca/keys.py)
            if not chosen:
                passphrase = secrets.token_urlsafe(32).encode()
                if outside:
                    generated = Path(outside)
                keys.write_private_file(Path(outside) if outside else staging / "passphrase", passphrase + b"\n")
            for name, key in hierarchy.keys.items():
                if maker is not None and name in maker.made:
                    pass                            # its reference is in staging already
                else:
                    keys.write_private_file(staging / f"{name}.key.pem",
                                            keys.encrypt_key(key, passphrase, stretch=chosen))
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
            # CA here, only rows of a CA nobody has: the next init replaces the deployment of its own
            # SQLite registry, and takes back a shared one's (_forget_interrupted)
            registry = open_registry(location, create=True, password=self.registry_password())
            try:
                deployment = {"root_fingerprint": hierarchy.records[0].fingerprint,     # records[0]: the root
                              "devid.toml": (config_text or self.config_path.read_bytes()).decode()}
                # a data directory's own registry with no CA here is an interrupted init's: its
                # deployment goes; a shared one may be another host's, and is refused
                registry.record_certificates(hierarchy.records, deployment=deployment, replace_deployment=not shared)
                try:
                    if config_text is not None:
                        write_atomic(self.config_path, config_text)
                    move_into_place()
                except BaseException:
                    if shared:          # a shared registry is not removed: take this init's rows back out
                        try:
                            registry.forget_init(hierarchy.records)
                        except Exception:
                            pass
                    raise
            finally:
                registry.close()
        except BaseException:
            undone = True
            if not self.exists():                   # (never undo anything next to a CA that is there)
                if maker is not None:
                    undone = maker.undo()           # first: the staging directory names its keys
                self._undo_init(config_text is not None, had_registry, generated)
            if undone:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            (self.ca_dir / CONFIG_MARK).unlink(missing_ok=True)
        except OSError:
            pass

    def _forget_interrupted(self) -> None:
        """An init of this data directory killed after recording its CA in a shared registry and
        before renaming it into place left the registry naming a CA that nobody has (its keys
        are only in its staging directory here). If the registry's deployment is that CA's (its
        root is in a staging directory of this data directory) and no device was registered, its
        rows go, so this init can record its own; another host's CA is never touched."""
        from types import SimpleNamespace
        from devid.ca.identity import fingerprint
        interrupted: dict[str, list] = {}
        for stale in self.path.glob(".ca-init-*"):
            try:
                certs = [x509.load_pem_x509_certificate((stale / f"{n}.cert.pem").read_bytes()) for n in CERT_NAMES]
            except (OSError, ValueError):
                continue
            interrupted[fingerprint(certs[0])] = certs
        if not interrupted:
            return
        try:
            registry = open_registry(self.registry_location, password=self.registry_password())
        except StorageError:
            raise                           # unreachable, refused: the staging directories stay
        except RegistryError:
            return                          # an empty registry: nothing was recorded
        try:
            root = registry.deployment().get("root_fingerprint")
            if root in interrupted and not registry.forget_init(
                    [SimpleNamespace(serial=c.serial_number) for c in interrupted[root]]):
                raise CAExists(f"{registry.path} names the CA of an interrupted init of {self.path} (its files are "
                               "in a .ca-init-* directory there) and devices are registered under it: rename that "
                               "directory to ca/ to finish that init, rather than making a new CA")
        finally:
            registry.close()

    def _undo_init(self, wrote_config: bool, had_registry: bool, generated: Path | None) -> None:
        """After a failed init: remove devid.toml if this init wrote it (or replaced an interrupted
        init's), the registry if this init created it, and a passphrase file it generated."""
        self._config = None
        doomed = [self.config_path] if wrote_config else []
        if not had_registry:
            doomed += [self.db_path.with_name(self.db_path.name + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
        if generated is not None:
            doomed.append(generated)
        for path in doomed:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass

    # -- join: another gateway host of a shared registry ----------------------------------------

    def join(self, ca_from: Path, registry_password_file: Path | None = None) -> dict:
        """Make this data directory another gateway host of the PostgreSQL registry named by
        $DEVID_REGISTRY (`devid init --join URL`), from that registry and a copy of the first
        host's CA files (`ca_from`: DATA/ca of a host already serving it). No CA is created:

        - the registry must hold a deployment (`devid init --registry URL` on the first host);
        - the root certificate in `ca_from` must be the one the registry names, and every CA and
          gateway certificate there must be recorded in the registry;
        - every key must decrypt (the CA passphrase: $DEVID_CA_PASSPHRASE, or the `passphrase`
          file in `ca_from`, copied with mode 0600) and match its certificate;
        - devid.toml is the first host's, as recorded in the registry, with this [registry] url;
        - the PSK secret (psk.secret, if the first host has made one) is copied once it opens with
          the CA passphrase: every host must derive the same PSKs.

        Built in a staging directory and renamed into place as `init` does; on any error nothing
        is left here. Returns a summary (root fingerprint, certificates)."""
        url = os.environ.get(ENV_REGISTRY)
        if not url or not is_postgres_url(url):
            raise ConfigError("--join needs the shared registry's PostgreSQL URL")
        if self.exists() or self.ca_dir.exists():
            raise CAExists(f"a CA already exists in {self.path}: refusing to overwrite it")
        if self.config_path.exists():
            raise ConfigError(f"{self.config_path} exists: --join writes the shared registry's devid.toml; "
                              "move yours away first")
        ca_from = Path(ca_from)
        if not ca_from.is_dir():
            raise ConfigError(f"--ca-from {ca_from}: not a directory (a copy of the first host's DATA/ca)")
        password_file = str(Path(os.path.abspath(registry_password_file))) if registry_password_file else None
        self._config = Config(registry_url=url, registry_password_file=password_file)
        registry = open_registry(url, password=self.registry_password())
        try:
            deployment = registry.deployment()
            if "root_fingerprint" not in deployment:
                raise CANotInitialised(f"{redact(url)} holds no devid CA: run 'devid init --registry URL' on the "
                                       "first host")
            text = self._joined_config(deployment.get("devid.toml", ""), url, password_file)
            made_dir = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            staging = self.path / f".ca-join-{os.getpid()}-{secrets.token_hex(4)}"
            staging.mkdir(mode=0o700)
            wrote = False
            try:
                with directory_lock(self.path, wait=INIT_WAIT):
                    # again under the lock: an init that held it may have made a CA or devid.toml here
                    if self.exists() or self.ca_dir.exists() or self.config_path.exists():
                        raise CAExists(f"{self.path} now holds a CA or a devid.toml: refusing to overwrite it")
                    summary = self._join_staged(ca_from, staging, registry, deployment)
                    write_atomic(self.config_path, text)
                    wrote = True
                    try:
                        os.rename(staging, self.ca_dir)
                    except OSError:
                        raise CAExists(f"a CA already exists in {self.path}: refusing to overwrite it") from None
                    fsync_path(self.path)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                if not self.exists():
                    if wrote:
                        self.config_path.unlink(missing_ok=True)
                    if made_dir:
                        _remove_if_empty(self.path)
                raise
        finally:
            registry.close()
        self._config, self._issuers, self._passphrase = None, {}, None
        return summary

    @staticmethod
    def _joined_config(recorded: str, url: str, password_file: str | None) -> bytes:
        """The first host's devid.toml, as the registry holds it, with this host's [registry];
        a [ca] passphrase_file of the first host names a file of that host, so it is dropped."""
        try:
            doc = tomllib.loads(recorded)
        except tomllib.TOMLDecodeError:
            raise ConfigError("the registry's devid.toml is not valid TOML") from None
        doc.pop("ca", None)
        doc["registry"] = {"url": url, **({"password_file": password_file} if password_file else {})}
        import tomli_w
        text = (CONFIG_HEADER + " Joined to a shared registry: every host's copy comes from it.\n\n"
                + tomli_w.dumps(doc))
        Config.parse(text, "devid.toml (from the registry)")         # checked before anything is written
        return text.encode()

    def _join_staged(self, ca_from: Path, staging: Path, registry, deployment: dict) -> dict:
        from devid.ca.identity import fingerprint
        passphrase = os.environ.get(ENV_PASSPHRASE, "").encode()
        if not passphrase:
            source = ca_from / "passphrase"
            if not source.exists():
                raise keys.KeyFileError(f"no CA passphrase: set {ENV_PASSPHRASE}, or copy the first host's "
                                        f"passphrase file into {ca_from}")
            keys.check_private_file(source)
            passphrase = source.read_bytes().strip()
            keys.write_private_file(staging / "passphrase", passphrase + b"\n")
        summary: dict = {"root_fingerprint": deployment["root_fingerprint"], "certificates": {}}
        certs: dict[str, x509.Certificate] = {}
        for name in CERT_NAMES:
            cert_file, key_file = ca_from / f"{name}.cert.pem", ca_from / f"{name}.key.pem"
            ref_file = ca_from / f"{name}{ca_keys.REF_SUFFIX}"
            try:
                cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            except FileNotFoundError:
                raise CANotInitialised(f"{cert_file}: missing (copy the first host's DATA/ca)") from None
            except ValueError:
                raise CAError(f"{cert_file}: not a PEM certificate") from None
            fp = fingerprint(cert)
            if name == "root" and fp != deployment["root_fingerprint"]:
                raise CAError(f"{cert_file} is not the root of this registry's CA "
                              f"(registry: {deployment['root_fingerprint'][:16]}..., file: {fp[:16]}...)")
            record = registry.get_certificate(cert.serial_number)
            if record is None or record.fingerprint != fp:
                raise CAError(f"{cert_file} is not recorded in the registry: not this deployment's {name} certificate")
            shutil.copyfile(cert_file, staging / cert_file.name)
            if ref_file.exists():               # a CA key in a token this host reaches too (a network HSM)
                ca_keys.load_token_key(ref_file, cert)
                keys.write_private_file(staging / ref_file.name, ref_file.read_bytes())
            else:
                keys.check_private_file(key_file)
                key = keys.load_encrypted_key(key_file, passphrase)
                if key.public_key() != cert.public_key():
                    raise keys.KeyFileError(f"{key_file} does not match {cert_file}")
                keys.write_private_file(staging / key_file.name, key_file.read_bytes())
            certs[name] = cert
            summary["certificates"][name] = fp
        (staging / "gateway.chain.pem").write_bytes(
            b"".join(certs[n].public_bytes(serialization.Encoding.PEM) for n in ("gateway", "operational")))
        secret_file = ca_from / psk.SECRET_FILE
        check = deployment.get(psk.SECRET_CHECK_KEY)
        if secret_file.exists():
            # every host derives the same PSKs: the first host's sealed secret, checked to open
            # with the CA passphrase and to be the registry's (a host with another would refuse
            # every PSK device)
            secret = psk.load_secret(secret_file, passphrase)
            if check is not None and secret is not None and psk.secret_check(secret) != check:
                raise CAError(f"{secret_file} is not the PSK secret of this registry's devices (another host's?)")
            keys.write_private_file(staging / psk.SECRET_FILE, secret_file.read_bytes())
            summary["psk_secret"] = True
        elif check is not None:
            raise CAError(f"{ca_from} has no psk.secret, but this registry's PSK devices use one: copy the first "
                          "host's DATA/ca with it")
        for entry in staging.iterdir():
            fsync_path(entry)
        fsync_path(staging)
        return summary
