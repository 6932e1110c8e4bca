"""Factory provisioning (design document, phases 2 and 3): N new devices, each with a key in its
(simulated) secure element, a factory certificate (IDevID) and its secure-element layout.

For each device, OUT/<serial>/ (mode 0700; OUT defaults to DATA/factory/) holds:
    key.pem                      PKCS#8 private key, mode 0600 (stands in for the secure element slot)
    cert.pem                     the IDevID
    chain.pem                    IDevID + manufacturing CA
    ca.pem                       the root CA, to authenticate the gateway
    secure-element-config.json   element type, I2C address, key slots, lock flags
    psk-identity.txt             with --psk: the device's factory PSK identity (its serial), mode 0600
    psk-key.txt                  with --psk: its factory PSK, 16 characters, mode 0600 (ca/psk.py)

With a secure element (`--secure-element URI`, secure_element.py) the key is generated in a
PKCS#11 token instead, the certificates are stored there too, the configuration records the
token's objects, and there is no key.pem.

Key material stays private: OUT is made mode 0700 when this run creates it, every bundle directory
is 0700 and every key file 0600 (before the umask, which can only narrow them), so only the
provisioning account reads the keys until the factory station flashes them (docs/certificates.md).

Crash safety: serials are reserved in the registry first (a rerun or a parallel run never reuses
one). Each batch's bundles are written under OUT/.partial-<serial>/, then the batch's devices and
certificates are committed in one transaction, then the directories are renamed into place. A
crash leaves at most partial directories, which the next run finishes (if their device was
committed) or removes (if it was not).

Power cuts: every bundle file is fsynced when written, then each partial directory and OUT
(so the partial directories' names are on disk), then the batch is committed durably (the
registry's WAL is fsynced: gateway/store/database.py), then the directories are renamed and OUT is
fsynced again. So after a power cut every bundle in its final place is in the registry with
all its files, and every registered device has its bundle, final or partial (which the next run
finishes).

One run at a time per output directory: a run holds an advisory lock on OUT (gateway/system/fs.py) from
before its recovery of partial directories to its end, and a second run refuses at once, naming
the first one's pid. (Waiting was the alternative: a provisioning run lasts minutes, so a second
run would sit silently for that long, and the usual cause is a mistake, e.g. two factory
stations given one directory; serial numbers stay unique across output directories anyway.)

Several cores: with `workers` > 1, forked worker processes generate keys, sign certificates and
write the partial bundles of whole batches (the CPU work), and hand the batch's records back. The
parent, the only process that touches SQLite, commits each batch in one transaction and renames
its directories, in the order the batches finish. Workers never open the registry: a forked child
inherits the parent's SQLite state (open file descriptors, the shared-memory WAL index and the
library's per-file lock bookkeeping), which SQLite does not support using after fork(). Workers
die with the parent (gateway/system/lifeline.py: PR_SET_PDEATHSIG, and a watch on getppid() if that
fails), so a killed run leaves only partial directories, whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import shutil
import signal
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca import psk as ca_psk
from devid.ca.authority import CertificateAuthority
from devid.ca.identity import PREFIX_RE, check_device_type, fingerprint
from devid.ca.keys import plain_key
from devid.ca.store import CertificateRecord, DeviceRecord

from devid.gateway.errors import DirectoryBusy, ProvisioningError
from devid.gateway.factory import secure_element as se
from devid.gateway.system.fs import directory_lock, fsync_path, write_synced
from devid.gateway.system.lifeline import die_with_parent

PARTIAL = ".partial-"
DEFAULT_OUT = "factory"     # `devid provision` writes into DATA/factory/ unless --out says otherwise
PRIVATE_DIR = 0o700
DEFAULT_PREFIX = "SN"
SERIAL_DIGITS = 8
BATCH = 500
BATCHES_PER_WORKER = 4      # smaller batches with several workers: the work evens out, progress moves


def secure_element_config(serial: str, device_type: str, cert: x509.Certificate) -> dict:
    """The design document's ATECC608A layout, plus which identity went into it."""
    return {
        "device_serial": serial,
        "device_type": device_type,
        "secure_element": {
            "type": "ATECC608A",
            "i2c_address": "0x60",
            "key_slots": {"device_private_key": 0, "device_certificate": 10, "ca_certificate": 11},
        },
        "provisioning": {"lock_configuration": True, "lock_data": True, "enable_hardware_rng": True},
        "certificate": {
            "serial": format(cert.serial_number, "x"),
            "sha256_fingerprint": fingerprint(cert),
            "not_after": _utc_text(cert.not_valid_after_utc),
        },
    }


def _utc_text(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="seconds")[:19] + "Z"


# The same text as json.dumps(secure_element_config(...), indent=2) + "\n" (a test holds them
# equal), without the pure-Python encoder that `indent` forces (11 % of provisioning). Every value
# put in is JSON-safe as is: serial and device type are checked against [A-Za-z0-9.-] and [a-z0-9._-], the
# certificate serial and fingerprint are hex, the date is digits, '-', ':', 'T' and 'Z'.
_SE_CONFIG = """{
  "device_serial": "%s",
  "device_type": "%s",
  "secure_element": {
    "type": "ATECC608A",
    "i2c_address": "0x60",
    "key_slots": {
      "device_private_key": 0,
      "device_certificate": 10,
      "ca_certificate": 11
    }
  },
  "provisioning": {
    "lock_configuration": true,
    "lock_data": true,
    "enable_hardware_rng": true
  },
  "certificate": {
    "serial": "%s",
    "sha256_fingerprint": "%s",
    "not_after": "%s"
  }
}
"""


def secure_element_json(device: DeviceRecord, record: CertificateRecord) -> bytes:
    """secure-element-config.json for a device (validated serial and type) and its factory certificate."""
    return (_SE_CONFIG % (device.serial, device.device_type, format(record.serial, "x"), record.fingerprint,
                          _utc_text(record.not_after))).encode()


@dataclass
class ProvisionResult:
    serials: list[str]
    seconds: float
    recovered: int
    discarded: int
    ca_trusted: bool | None = None      # with a secure element: is its root CA certificate object trusted

    @property
    def rate(self) -> float:
        return len(self.serials) / self.seconds if self.seconds > 0 else float("inf")


def recover_partials(ca: CertificateAuthority, out: Path,
                     element: "se.SecureElement | None" = None) -> tuple[int, int]:
    """Finish what a crashed run left: keep bundles whose device was committed, drop the rest.
    A dropped bundle whose key was (or may have been) generated in a token takes its objects in
    the token with it: that needs the run to be given the same token (`element`)."""
    recovered = discarded = 0
    forgot_any = False
    if not out.is_dir():
        return 0, 0
    for entry in sorted(out.iterdir()):
        if not entry.name.startswith(PARTIAL):
            continue
        serial = entry.name[len(PARTIAL):]
        final = out / serial
        keep = False
        try:
            cert = x509.load_pem_x509_certificate((entry / "cert.pem").read_bytes())
            record = ca.store.get_certificate(cert.serial_number)
            keep = (record is not None and record.device_serial == serial and
                    record.fingerprint == fingerprint(cert) and
                    ((entry / "key.pem").exists() or se.has_token_key(entry)) and
                    (entry / "secure-element-config.json").exists() and not final.exists())
        except (OSError, ValueError):
            keep = False
        if keep:
            (entry / se.MARKER).unlink(missing_ok=True)
            os.rename(entry, final)
            recovered += 1
            continue
        found = se.partial_token(entry)
        if found is not None and ca.store.get_device(serial) is None:
            token, kid = found
            if element is None or not se.same_token(element.uri, token):
                raise ProvisioningError(f"{entry} is what an interrupted run left of a device whose key may be in "
                                        f"the PKCS#11 {token.token_label}: run again with --secure-element "
                                        f"naming that token, so that the key is removed with it")
            if kid is not None:
                element.forget(kid)
                forgot_any = True
        shutil.rmtree(entry, ignore_errors=True)
        discarded += 1
    if forgot_any and element is not None:
        element.forget_unnamed()
    if recovered or discarded:
        fsync_path(out)
    return recovered, discarded


@dataclass(frozen=True)
class _Job:
    """What every batch needs; handed to forked workers in memory (never pickled: it holds CA keys)."""

    ca: CertificateAuthority
    device_type: str
    out: str
    manufacturing_pem: bytes
    root_pem: bytes
    prefix: str
    now: Callable[[], datetime]
    element: "se.SecureElement | None" = None
    psk_secret: bytes | None = None     # --psk: each bundle gets its factory PSK (ca/psk.py)

    def write_batch(self, first: int, n: int) -> list[tuple[DeviceRecord, CertificateRecord]]:
        """Keys, certificates and partial bundles for serials first .. first+n-1; registers nothing.
        On failure, removes the partial directories it made and re-raises."""
        ca, device_type, out, prefix, element = self.ca, self.device_type, self.out, self.prefix, self.element
        chain_tail, root_pem, curve = self.manufacturing_pem, self.root_pem, ec.SECP256R1()
        t = self.now()
        pairs: list[tuple[DeviceRecord, CertificateRecord]] = []
        made: dict[str, bytes | None] = {}     # serial -> its key's CKA_ID in the token
        try:
            for number in range(first, first + n):
                serial = f"{prefix}{number:0{SERIAL_DIGITS}d}"
                partial = f"{out}/{PARTIAL}{serial}"
                if element is None:
                    key = ec.generate_private_key(curve)
                    public = key.public_key()
                else:
                    # the directory (and its marker) before the key: a crash leaves no key object
                    # the next run cannot find (secure_element.py)
                    kid = se.new_key_id(serial)
                    os.mkdir(partial, PRIVATE_DIR)
                    made[serial] = kid
                    write_synced(f"{partial}/{se.MARKER}", se.marker_text(element.recorded, kid))
                    fsync_path(partial)
                    fsync_path(out)     # a power cut keeps the marker that names the key about to be made
                    key, public = element.new_key(serial, kid)
                device, issued = ca.new_factory_identity(public, serial, device_type, t)
                if self.psk_secret is not None:
                    device = dataclasses.replace(device, psk=True)      # it may open PSK sessions
                if element is None:
                    os.mkdir(partial, PRIVATE_DIR)
                    made[serial] = None
                    write_synced(f"{partial}/key.pem", plain_key(key), 0o600)
                    config = secure_element_json(device, issued.record)
                else:
                    element.store_certificate(serial, kid, issued.cert)
                    config = se.config_json(secure_element_json(device, issued.record), element.section(serial, kid))
                cert_pem = issued.pem
                write_synced(f"{partial}/cert.pem", cert_pem)
                write_synced(f"{partial}/chain.pem", cert_pem + chain_tail)
                write_synced(f"{partial}/ca.pem", root_pem)
                if self.psk_secret is not None:      # before the configuration: a bundle that has it is whole
                    name = ca_psk.factory_identity(serial)
                    write_synced(f"{partial}/psk-identity.txt", name.encode(), 0o600)
                    write_synced(f"{partial}/psk-key.txt", ca_psk.derive_key(self.psk_secret, name), 0o600)
                write_synced(f"{partial}/secure-element-config.json", config)
                if element is not None:
                    os.unlink(f"{partial}/{se.MARKER}")     # the configuration names the token now
                fsync_path(partial)
                pairs.append((device, issued.record))
            fsync_path(out)             # the partial directories' names, before the commit
        except BaseException:
            for serial, kid in made.items():
                self._drop(serial, kid)
            raise
        return pairs

    def _drop(self, serial: str, kid: bytes | None = None) -> None:
        """Remove an uncommitted device's partial directory, and its objects in the token (its
        CKA_ID: `kid`, else what the directory records)."""
        if self.element is not None and kid is None:
            found = se.partial_token(Path(f"{self.out}/{PARTIAL}{serial}"))
            kid = found[1] if found else None
        if self.element is not None and kid is not None:
            try:
                self.element.forget(kid)
            except Exception:           # the directory stays: the next run removes both
                return
        shutil.rmtree(f"{self.out}/{PARTIAL}{serial}", ignore_errors=True)

    def commit(self, pairs: Sequence[tuple[DeviceRecord, CertificateRecord]]) -> None:
        """Register a written batch in one durable transaction, then move its bundles into place.
        If the registration fails, the batch's partial directories are removed."""
        try:
            self.ca.store.register_devices(pairs)
        except BaseException:
            self.discard(pairs)
            raise
        out = self.out
        for device, _ in pairs:
            os.rename(f"{out}/{PARTIAL}{device.serial}", f"{out}/{device.serial}")
        fsync_path(out)

    def discard(self, pairs: Sequence[tuple[DeviceRecord, CertificateRecord]]) -> None:
        for device, _ in pairs:
            self._drop(device.serial)


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:          # not Linux
        return max(1, os.cpu_count() or 1)


def provision(ca: CertificateAuthority, *, count: int, device_type: str, out: Path,
              manufacturing_pem: bytes, root_pem: bytes,
              serial_prefix: str = DEFAULT_PREFIX, now: Callable[[], datetime],
              progress: Callable[[int, int], None] | None = None, batch: int = BATCH,
              workers: int | None = None, secure_element: "se.SecureElement | None" = None,
              psk_secret: bytes | None = None) -> ProvisionResult:
    """Provision `count` new devices into `out`. `workers` processes (default: one per CPU) build
    and write the batches; fewer are used when there are fewer batches, and none (all in this
    process) for one batch or where fork() is not available. `secure_element`: each device's key
    is generated in that token, and its certificates are stored there (secure_element.py).
    `psk_secret`: each bundle gets its factory PSK identity and key too (ca/psk.py)."""
    if count <= 0:
        raise ProvisioningError("--count must be at least 1")
    if batch <= 0:
        raise ProvisioningError("the batch size must be at least 1")
    if workers is not None and workers <= 0:
        raise ProvisioningError("--workers must be at least 1")
    check_device_type(device_type)
    if not PREFIX_RE.fullmatch(serial_prefix):
        raise ProvisioningError(f"invalid serial prefix {serial_prefix!r}: use up to 32 characters A-Z a-z 0-9 . -")
    longest = len(ca_psk.operational_identity(serial_prefix)) + SERIAL_DIGITS
    if psk_secret is not None and longest > ca_psk.MAX_IDENTITY:
        raise ProvisioningError(f"--psk: serial prefix {serial_prefix!r} is too long: PSK identities must fit "
                                f"{ca_psk.MAX_IDENTITY} bytes (tinydtls), so use at most "
                                f"{ca_psk.MAX_IDENTITY - len(ca_psk.OPERATIONAL_PREFIX) - SERIAL_DIGITS} characters")
    out.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    try:
        with directory_lock(out):
            return _provision(ca, count, device_type, out, manufacturing_pem, root_pem, serial_prefix, now,
                              progress, batch, workers, secure_element, psk_secret)
    except DirectoryBusy as exc:
        who = f"pid {exc.pid}" if exc.pid else "another process"
        raise ProvisioningError(f"another devid provision ({who}) is writing to {out}: wait for it to end, "
                                f"or use another --out directory") from None


def _provision(ca: CertificateAuthority, count: int, device_type: str, out: Path, manufacturing_pem: bytes,
               root_pem: bytes, serial_prefix: str, now: Callable[[], datetime],
               progress: Callable[[int, int], None] | None, batch: int, workers: int | None,
               element: "se.SecureElement | None" = None, psk_secret: bytes | None = None) -> ProvisionResult:
    recovered, discarded = recover_partials(ca, out, element)
    if element is not None:
        element = element.prepare(x509.load_pem_x509_certificate(root_pem))
    started = time.perf_counter()
    first = ca.store.reserve_serial_block(serial_prefix, count)
    if element is not None:
        element.check_free([f"{serial_prefix}{n:0{SERIAL_DIGITS}d}" for n in range(first, first + count)])
    workers = default_workers() if workers is None else workers
    if "fork" not in multiprocessing.get_all_start_methods():
        workers = 1
    if workers > 1:
        batch = max(1, min(batch, math.ceil(count / (workers * BATCHES_PER_WORKER))))
    batches = [(first + offset, min(batch, count - offset)) for offset in range(0, count, batch)]
    workers = min(workers, len(batches))
    if element is not None and workers > 1:
        element = replace(element, lock=multiprocessing.get_context("fork").Lock())    # secure_element.py
    job = _Job(ca, device_type, str(out), manufacturing_pem, root_pem, serial_prefix, now, element, psk_secret)
    committed: list[list[tuple[DeviceRecord, CertificateRecord]]] = []

    def done(pairs: list[tuple[DeviceRecord, CertificateRecord]]) -> None:
        job.commit(pairs)
        committed.append(pairs)
        if progress:
            progress(sum(len(p) for p in committed), count)

    if workers <= 1:
        for start, n in batches:
            done(job.write_batch(start, n))
    else:
        _run_parallel(job, batches, workers, done)
    serials = sorted(device.serial for pairs in committed for device, _ in pairs)
    return ProvisionResult(serials, time.perf_counter() - started, recovered, discarded,
                           element.trusted if element is not None else None)


# -- worker processes -------------------------------------------------------------------------------

_worker_job: _Job | None = None


def _worker_init(job: _Job, parent: int) -> None:
    global _worker_job
    _worker_job = job
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the parent's to handle: it lets batches end
    # a killed provisioning run leaves no worker behind that could write bundles the next run is
    # recovering (the workers also hold the run's lock on OUT until they are gone)
    die_with_parent(parent, signal.SIGKILL)


def _worker_batch(first: int, n: int) -> list[tuple[DeviceRecord, CertificateRecord]]:
    assert _worker_job is not None
    return _worker_job.write_batch(first, n)


def _run_parallel(job: _Job, batches: list[tuple[int, int]], workers: int,
                  done: Callable[[list[tuple[DeviceRecord, CertificateRecord]]], None]) -> None:
    """Workers write batches; this process commits and renames each as it finishes. On the first
    failure (or Ctrl-C), batches not started are cancelled, the running ones are waited for and
    their bundles discarded uncommitted, and the error is raised: what was committed stays."""
    ctx = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(job, os.getpid()))
    unhandled: set[Future] = set()
    try:
        futures = [pool.submit(_worker_batch, start, n) for start, n in batches]
        unhandled.update(futures)
        for future in as_completed(futures):
            unhandled.discard(future)
            done(future.result())
    except BaseException:
        for future in unhandled:
            future.cancel()
        for future in unhandled:
            try:
                job.discard(future.result())
            except BaseException:   # cancelled, or failed (it removed its own directories)
                pass
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
