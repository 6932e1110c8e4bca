"""Factory provisioning (design document, phases 2 and 3): N new devices, each with a key in its
(simulated) secure element, a factory certificate (IDevID) and its secure-element layout.

For each device, OUT/<serial>/ holds:
    key.pem                      PKCS#8 private key, mode 0600 (stands in for the secure element slot)
    cert.pem                     the IDevID
    chain.pem                    IDevID + manufacturing CA
    ca.pem                       the root CA, to authenticate the gateway
    secure-element-config.json   element type, I2C address, key slots, lock flags

Crash safety: serials are reserved in the registry first (a rerun or a parallel run never reuses
one). Each batch's bundles are written under OUT/.partial-<serial>/, then the batch's devices and
certificates are committed in one transaction, then the directories are renamed into place. A
crash leaves at most partial directories, which the next run finishes (if their device was
committed) or removes (if it was not).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ca.authority import CertificateAuthority
from ca.errors import CAError
from ca.identity import PREFIX_RE, check_device_type, fingerprint
from ca.keys import plain_key

PARTIAL = ".partial-"
DEFAULT_PREFIX = "SN"
SERIAL_DIGITS = 8
BATCH = 500


class ProvisioningError(CAError):
    pass


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
            "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    }


@dataclass
class ProvisionResult:
    serials: list[str]
    seconds: float
    recovered: int
    discarded: int

    @property
    def rate(self) -> float:
        return len(self.serials) / self.seconds if self.seconds > 0 else float("inf")


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def recover_partials(ca: CertificateAuthority, out: Path) -> tuple[int, int]:
    """Finish what a crashed run left: keep bundles whose device was committed, drop the rest."""
    recovered = discarded = 0
    if not out.is_dir():
        return 0, 0
    for entry in out.iterdir():
        if not entry.name.startswith(PARTIAL):
            continue
        serial = entry.name[len(PARTIAL):]
        final = out / serial
        keep = False
        try:
            cert = x509.load_pem_x509_certificate((entry / "cert.pem").read_bytes())
            record = ca.store.get_certificate(cert.serial_number)
            keep = (record is not None and record.device_serial == serial and
                    record.fingerprint == fingerprint(cert) and (entry / "key.pem").exists() and
                    (entry / "secure-element-config.json").exists() and not final.exists())
        except (OSError, ValueError):
            keep = False
        if keep:
            os.rename(entry, final)
            recovered += 1
        else:
            shutil.rmtree(entry, ignore_errors=True)
            discarded += 1
    return recovered, discarded


def provision(ca: CertificateAuthority, *, count: int, device_type: str, out: Path,
              manufacturing_pem: bytes, root_pem: bytes,
              serial_prefix: str = DEFAULT_PREFIX, now: Callable[[], datetime],
              progress: Callable[[int, int], None] | None = None, batch: int = BATCH) -> ProvisionResult:
    if count <= 0:
        raise ProvisioningError("--count must be at least 1")
    check_device_type(device_type)
    if not PREFIX_RE.match(serial_prefix):
        raise ProvisioningError(f"invalid serial prefix {serial_prefix!r}: use up to 32 characters A-Z a-z 0-9 . _ -")
    out.mkdir(parents=True, exist_ok=True)
    recovered, discarded = recover_partials(ca, out)
    started = time.perf_counter()
    first = ca.store.reserve_serial_block(serial_prefix, count)
    serials: list[str] = []
    done = 0
    for offset in range(0, count, batch):
        numbers = range(first + offset, first + min(offset + batch, count))
        pairs = []
        dirs = []
        t = now()
        try:
            for n in numbers:
                serial = f"{serial_prefix}{n:0{SERIAL_DIGITS}d}"
                key = ec.generate_private_key(ec.SECP256R1())
                device, issued = ca.new_factory_identity(key.public_key(), serial, device_type, t)
                partial = out / f"{PARTIAL}{serial}"
                partial.mkdir()
                dirs.append((partial, out / serial))
                cert_pem = issued.pem
                _write(partial / "key.pem", plain_key(key), 0o600)
                _write(partial / "cert.pem", cert_pem)
                _write(partial / "chain.pem", cert_pem + manufacturing_pem)
                _write(partial / "ca.pem", root_pem)
                _write(partial / "secure-element-config.json",
                       json.dumps(secure_element_config(serial, device_type, issued.cert), indent=2).encode() + b"\n")
                pairs.append((device, issued.record))
            ca.store.register_devices(pairs)
        except BaseException:
            for partial, _ in dirs:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        for partial, final in dirs:
            os.rename(partial, final)
        serials.extend(d.serial for d, _ in pairs)
        done += len(pairs)
        if progress:
            progress(done, count)
    return ProvisionResult(serials, time.perf_counter() - started, recovered, discarded)

