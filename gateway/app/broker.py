"""`devid mqtt broker-config`: everything a Mosquitto broker needs to give enrolled devices, and
only them, service access over MQTT with TLS client certificates (docs/mqtt.md).

    OUT/mosquitto.conf     listener, TLS >= 1.2, client certificate required, identity as user
                           name, CRL, ACL, no anonymous clients, TCP_NODELAY (absolute paths)
    OUT/broker.cert.pem    the broker's server certificate (operational CA, serverAuth, SAN =
                           --hostname), then the operational CA: what devices check
    OUT/broker.key.pem     its key, PKCS#8, mode 0600 (0640 with --owner: group-readable by the broker)
    OUT/ca.pem             the one trust anchor: the operational CA's own name and key,
                           self-signed (devid.ca.hierarchy.build_trust_anchor). Only operational
                           certificates chain to it: a factory certificate has no path, even
                           sent with its chain (docs/certificates.md#service-access)
    OUT/crl.pem            a fresh CRL of the operational CA (its revoked certificates)
    OUT/acl                per enrolled device: `user device-SERIAL` and its topics, from the
                           [mqtt] table of its type's configuration template

Running it again keeps the broker's certificate and key (reissued only when the host names change,
the operational CA changes or it has less than 30 days left) and the anchor, and replaces the
CRL, the ACL and the configuration, each atomically: `kill -HUP` the broker (or `--reload-pid
PID`) to load them. Runs on one OUT take turns (a lock on OUT). The broker's account never owns a
file or OUT itself (`--owner USER` gives USER's group read access): a broker account that could
write OUT could plant links that a later run, as root, would follow.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import secrets
import signal
import stat
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca import keys
from devid.ca.hierarchy import build_gateway_cert, build_trust_anchor, gateway_names, record_for
from devid.ca.revocation import build_crl
from devid.ca.store import DeviceState
from devid.gateway.app.datadir import DataDir
from devid.gateway.errors import ConfigError
from devid.gateway.store.configuration import ConfigTemplates
from devid.gateway.system.fs import directory_lock, fsync_path, write_atomic

DEFAULT_PORT = 8883
RENEW_BEFORE = timedelta(days=30)
FILES = ("mosquitto.conf", "broker.cert.pem", "broker.key.pem", "ca.pem", "crl.pem", "acl")


def _broker_cert_current(out: Path, hostnames: list[str], operational: x509.Certificate, now: datetime) -> bool:
    """Is the broker certificate in OUT this CA's, for exactly these names, with its key, and
    good for another RENEW_BEFORE?"""
    try:
        chain = x509.load_pem_x509_certificates((out / "broker.cert.pem").read_bytes())
        key = keys.load_plain_key(out / "broker.key.pem")
    except (OSError, ValueError, keys.KeyFileError):
        return False
    cert = chain[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        cert.verify_directly_issued_by(operational)      # this CA's key, not only its name
    except Exception:                   # no SAN, another key's signature: not this CA's current one
        return False
    return (chain[1:] == [operational] and key.public_key() == cert.public_key()
            and list(san) == gateway_names(hostnames, localhost=False)
            and cert.not_valid_after_utc - now > RENEW_BEFORE)


def acl_text(data: DataDir, registry) -> tuple[str, int]:
    """The ACL: each enrolled device whose type's template has [mqtt] gets its topics; (text, devices)."""
    templates = ConfigTemplates(data.path / "config", data.cert)
    templates.ensure_default()
    lines = ["# written by devid mqtt broker-config: one entry per enrolled device (docs/mqtt.md).",
             "# A client's user name is its certificate's common name (use_identity_as_username).", ""]
    count = 0
    roots: list[tuple[str, str]] = []
    for device in registry.list_devices(DeviceState.ENROLLED):
        access = templates.mqtt_topics(device.serial, device.device_type)
        if not access:
            continue
        topics, device_roots = access
        lines.append(f"user device-{device.serial}")
        lines += [f"topic readwrite {topic}" for topic in topics]
        lines.append("")
        roots += [(root + "/", device.serial) for root in device_roots]
        count += 1
    # no device's tree inside another's (a serial equal to a literal level of another template's
    # filter, e.g. devices/{serial}/# of serial "x" and devices/x/{serial}/#): sorted with a "/"
    # after each root, a root's subtrees follow it directly
    roots.sort()
    for (root, serial), (inner, other) in zip(roots, roots[1:]):
        if other != serial and inner.startswith(root):
            raise ConfigError(f"the MQTT tree {inner.rstrip('/')} of device {other} is inside {root.rstrip('/')}, the "
                              f"tree of device {serial}: change the topics of their types' templates")
    return "\n".join(lines) + "\n", count


def config_text(out: Path, port: int, listen: str) -> str:
    o = out.resolve()
    return f"""# written by devid mqtt broker-config (docs/mqtt.md); run it again to renew the CRL and the ACL,
# then SIGHUP the broker. Every path is absolute.
per_listener_settings false
persistence false
log_dest stderr
set_tcp_nodelay true
allow_anonymous false
acl_file {o / "acl"}

listener {port} {listen}
cafile {o / "ca.pem"}
certfile {o / "broker.cert.pem"}
keyfile {o / "broker.key.pem"}
crlfile {o / "crl.pem"}
require_certificate true
use_identity_as_username true
use_username_as_clientid true
tls_version tlsv1.2
"""


def broker_config(data: DataDir, out: Path, *, hostnames: list[str], port: int = DEFAULT_PORT,
                  listen: str = "0.0.0.0", owner: str | None = None, reload_pid: int | None = None,
                  now: datetime, rand_bytes=os.urandom) -> dict:
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: not a TCP port")
    if reload_pid is not None and reload_pid <= 1:
        raise ConfigError(f"--reload-pid {reload_pid}: not a broker's process id")
    try:
        listen = str(ipaddress.ip_address(listen))
    except ValueError:
        raise ConfigError(f"--listen {listen!r}: not an IP address (0.0.0.0, ::, 127.0.0.1, ...)") from None
    gid = None
    if owner is not None:
        try:
            gid = pwd.getpwnam(owner).pw_gid
        except KeyError:
            raise ConfigError(f"--owner {owner}: no such user") from None
    out = Path(out)
    out.mkdir(mode=0o750, parents=True, exist_ok=True)
    with directory_lock(out, wait=30.0):
        summary = _write(data, out, hostnames, port, listen, gid, now, rand_bytes)
    fsync_path(out)
    summary["reloaded"] = False
    if reload_pid is not None:
        signal_broker(reload_pid, "--reload-pid")
        summary["reloaded"] = True
    return summary


def broker_pid(spec: int | str | Path) -> int:
    """The broker's pid: `spec` itself, or read from a pid file (Mosquitto's `pid_file`, a
    service manager's): read again at each use, so a restarted broker is found."""
    if isinstance(spec, int):
        return spec
    try:
        text = Path(spec).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{spec}: cannot read the broker's pid file ({exc.strerror})") from None
    if not text.isdigit() or int(text) <= 1:
        raise ConfigError(f"{spec}: not a pid file (it holds {text[:20]!r})")
    return int(text)


def signal_broker(spec: int | str | Path, option: str) -> int:
    """SIGHUP to the broker (it reads its CRL and ACL again); its pid. Only a process named
    `mosquitto` is signalled, and never this one: a pid file the broker's account can write (or
    a pid reused after the broker died) must not make devid send SIGHUP, which ends most
    programs, to another process."""
    pid = broker_pid(spec)
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"{option} {spec}: no such process (the files are written)") from None
    except OSError as exc:
        raise ConfigError(f"{option} {spec}: cannot look at process {pid} ({exc.strerror})") from None
    if name != "mosquitto" or pid == os.getpid():
        raise ConfigError(f"{option} {spec}: process {pid} is {name!r}, not a Mosquitto broker: not signalled "
                          "(the files are written)")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ConfigError(f"{option} {spec}: no such process (the files are written)") from None
    except PermissionError:
        raise ConfigError(f"{option} {spec}: not allowed to signal it (the files are written)") from None
    return pid


def _install(out: Path, name: str, body: bytes) -> None:
    """Replace OUT/NAME with `body` for the broker to read: NAME must be a regular file (or
    absent); its replacement gets OUT's group and NAME's mode without any write or execute bit
    for group or others (0640 when new) before a byte is written: a temporary file of a random
    name (O_EXCL, O_NOFOLLOW), fsynced and renamed over NAME. A crash leaves the old file or the
    new one, each with the right group and mode."""
    target = out / name
    try:
        held = os.stat(target, follow_symlinks=False)
    except FileNotFoundError:
        held = None
    if held is not None and not stat.S_ISREG(held.st_mode):
        raise ConfigError(f"{target}: not a regular file: not replaced (remove it, run broker-config again)")
    mode = 0o640 if held is None else held.st_mode & 0o640
    tmp = out / f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchown(fd, -1, os.stat(out).st_gid)
        os.fchmod(fd, mode)
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def _crl_serials(path: Path) -> tuple[set[int], datetime | None, datetime | None] | None:
    """The serials a held CRL lists, its thisUpdate and nextUpdate; None if unreadable."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError):
        return None
    return {e.serial_number for e in crl}, crl.last_update_utc, crl.next_update_utc


def refresh(data: DataDir, out: Path, *, now: datetime, reload: int | str | Path | None = None,
            option: str = "--mqtt-broker-pid", registry=None) -> dict:
    """The CRL and the ACL again, nothing else (what revocations, renewals and enrollments
    change), in a directory `broker_config` made (`_install`), then SIGHUP to `reload` (a pid
    or a pid file) if either changed. What `devid serve --mqtt-broker` does.

    A new CRL is signed only when the certificates it must list changed or the held one is past
    half its validity; the ACL is written only when its text changed; with neither, nothing is
    written and the broker is not signalled (a Mosquitto reload re-reads the whole ACL, which
    takes seconds at tens of thousands of devices). The CRL does not wait for the ACL: a
    template the ACL cannot be made from (ConfigError) leaves the old ACL in place and is raised
    after the CRL is written and the broker signalled."""
    out = Path(out)
    if not (out / "mosquitto.conf").is_file():
        raise ConfigError(f"{out}: no mosquitto.conf: run devid mqtt broker-config --out {out} first")
    own = registry is None
    registry = data.open_registry() if own else registry
    summary = {"out": str(out.resolve()), "crl_written": False, "crl_number": None, "crl_entries": None,
               "crl_next_update": None, "acl_written": False, "acl_devices": None, "reloaded": None}
    acl_error = None
    try:
        with directory_lock(out, wait=30.0):
            op = data.issuer("operational")
            listed = ({r.serial for r in registry.revoked_certificates("operational")}
                      | {r.serial for r, _ in registry.superseded_certificates("operational", now)})
            held = _crl_serials(out / "crl.pem")
            if (held is None or held[0] != listed or held[1] is None or held[2] is None
                    or now >= held[1] + (held[2] - held[1]) / 2):
                crl = build_crl(op, registry, now, validity=timedelta(days=data.config.crl_days))
                _install(out, "crl.pem", crl.crl.public_bytes(serialization.Encoding.PEM))
                summary.update(crl_written=True, crl_number=crl.number, crl_entries=crl.entries,
                               crl_next_update=_z(crl.next_update))
            else:
                summary.update(crl_entries=len(held[0]), crl_next_update=_z(held[2]))
            try:
                acl, devices = acl_text(data, registry)
                summary["acl_devices"] = devices
                try:
                    same = (out / "acl").read_bytes() == acl.encode()
                except OSError:
                    same = False
                if not same:
                    _install(out, "acl", acl.encode())
                    summary["acl_written"] = True
            except ConfigError as exc:
                acl_error = str(exc)
        fsync_path(out)
    finally:
        if own:
            registry.close()
    if reload is not None and (summary["crl_written"] or summary["acl_written"]):
        summary["reloaded"] = signal_broker(reload, option)
    if acl_error is not None:
        raise ConfigError(f"the ACL is not written (the old one stays; the CRL is current): {acl_error}")
    return summary


def _z(t: datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def _write(data: DataDir, out: Path, hostnames: list[str], port: int, listen: str, gid: int | None,
           now: datetime, rand_bytes) -> dict:
    registry = data.open_registry()
    try:
        acl, devices = acl_text(data, registry)     # first: a refused ACL issues and writes nothing
        op = data.issuer("operational")
        reissued = not _broker_cert_current(out, hostnames, op.cert, now)
        if reissued:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = build_gateway_cert(key, op, hostnames, data.config.identity, now, rand_bytes,
                                      common_name="devid MQTT broker", localhost=False)
            registry.record_certificates([record_for(cert, "operational", "broker", now)])
            write_atomic(out / "broker.key.pem", keys.plain_key(key), 0o600)
            write_atomic(out / "broker.cert.pem", cert.public_bytes(serialization.Encoding.PEM)
                         + op.cert.public_bytes(serialization.Encoding.PEM))
        anchor_current = False
        try:
            held = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
            anchor_current = (held.public_key() == op.cert.public_key() and held.subject == op.cert.subject
                              and held.not_valid_after_utc == op.cert.not_valid_after_utc)
        except (OSError, ValueError):
            pass
        if not anchor_current:
            write_atomic(out / "ca.pem", build_trust_anchor(op, rand_bytes).public_bytes(serialization.Encoding.PEM))
        crl = build_crl(op, registry, now, validity=timedelta(days=data.config.crl_days))
        write_atomic(out / "crl.pem", crl.crl.public_bytes(serialization.Encoding.PEM))
        write_atomic(out / "acl", acl.encode())
        write_atomic(out / "mosquitto.conf", config_text(out, port, listen).encode())
    finally:
        registry.close()
    if gid is not None:                 # the broker's group reads; the files and OUT stay ours
        os.chown(out, -1, gid)
        os.chmod(out, 0o750)
        for name in FILES:
            os.chown(out / name, -1, gid, follow_symlinks=False)
            os.chmod(out / name, 0o640, follow_symlinks=False)
    return {"out": str(out.resolve()), "config": str((out / "mosquitto.conf").resolve()), "port": port,
            "listen": listen, "hostnames": hostnames, "broker_certificate_reissued": reissued,
            "crl_number": crl.number, "crl_entries": crl.entries, "crl_next_update": crl.next_update.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "acl_devices": devices}
