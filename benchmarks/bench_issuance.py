#!/usr/bin/env python3
"""Issuance and provisioning throughput of devid, measured side by side with bare `cryptography`.

    .venv/bin/python benchmarks/bench_issuance.py [--seconds S] [--rounds R] [--provision-count N] [--json]

Shared machines are noisy, so no figure here is an absolute measurement on its own: every devid
figure is taken in the same run as its baseline, interleaved in rounds (the order alternates from
round to round), and the result is the median over the rounds. Ratios and overheads are medians of
the per-round *paired* ratios, which cancels most of the drift between rounds.

1. issue: `CertificateAuthority.issue_operational(csr_der, serial, now)` on a real data directory
   (CSR parsing and signature check, key policy, registry lookup, the 7 extensions, signing, and
   the SQLite transaction), against the bare `cryptography` recipe producing the same certificate
   (load DER CSR, is_signature_valid, same subject, same 7 extensions, same P-256 issuer key,
   serialize to DER). Single process, one core. Target: devid overhead <= 20 %.
2. provision: `gateway.provisioning.provision()` of N identities into a directory with its default
   workers (one process per CPU), against the bare work in one process (P-256 key, factory
   certificate with the same extensions, the same five files per device, no registry). Target:
   >= 1,000 identities/s. An informational row runs provision(workers=1): devid's per-core overhead.

An informational third side runs issue_operational with the registry stubbed out (a dict lookup
and no recording), which splits devid's overhead into its CA code and its SQLite recording.

A benchmark, not a test: it checks once that both sides produce equivalent certificates, then
only measures. `--profile` adds a cProfile breakdown of devid's two code paths. A file-creation
probe at start and end flags a slow file system (see fs_create_probe), which would make the
provisioning figures measure the disk rather than devid. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import io
import json
import os
import platform
import pstats
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import cryptography
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without the editable install too
    sys.path.insert(0, str(ROOT))

from devid.ca.authority import CertificateAuthority     # noqa: E402
from devid.ca.store import DeviceRecord                 # noqa: E402
from devid.gateway.app.datadir import DataDir               # noqa: E402
from devid.gateway.factory.provisioning import default_workers, provision   # noqa: E402

DEVICE_TYPE = "temperature-sensor"
ISSUE_OVERHEAD_TARGET = 0.20        # devid time / baseline time - 1
PROVISION_RATE_TARGET = 1000.0      # identities/s
SLOW_CREATE_US = 50                 # fs_create_probe above this: the file system weighs on provisioning
MIN_ROUNDS = 3                      # the provisioning budget never cuts below this
ISSUE_SLICES = 8                    # interleaved blocks per issuance round
CSR_POOL = 1000                     # distinct CSR keys, and as many registered devices


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:5.1f} s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# machine facts
# --------------------------------------------------------------------------------------------

def _fs_type(path: Path) -> str:
    """Filesystem type of the mount holding `path` (from /proc/mounts; 'unknown' elsewhere)."""
    try:
        best, fstype = "", "unknown"
        target = str(path.resolve())
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
        return fstype
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_facts() -> dict:
    """Which devid was measured: the commit, and the source files changed since it."""
    import subprocess
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        dirty = [line.split(maxsplit=1)[1]
                 for line in run("status", "--porcelain", "--", "ca", "gateway").splitlines() if line.strip()]
        return {"devid_commit": commit, "devid_uncommitted": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"devid_commit": "unknown", "devid_uncommitted": []}


def machine_facts(workdir: Path) -> dict:
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        openssl = backend.openssl_version_text()
    except Exception:                                     # pragma: no cover - informational only
        openssl = "unknown"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "cryptography": cryptography.__version__,
        "openssl": openssl,
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "nproc": affinity,
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "workdir_fs": _fs_type(workdir),
        **code_facts(),
    }


# --------------------------------------------------------------------------------------------
# the baseline: bare `cryptography`, same certificate content
# --------------------------------------------------------------------------------------------

def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(value)) + value


def _oid_der(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return _tlv(0x06, bytes(out))


class BareIssuer:
    """What a careful programmer writes with `cryptography` alone to issue the same certificate.

    Per-issuer constants (issuer name, AKI, the fixed extensions, the encoded OIDs) are built
    once, as any such code would; everything that depends on the device or its key is built per
    certificate.
    """

    HW_NAME_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.4")

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, *, organization: str,
                 pen: int, device_type_oid: str, hardware_type_oid: str, validity: timedelta,
                 backdate: timedelta, key_agreement: bool) -> None:
        self.key = key
        self.issuer_name = cert.subject
        self.issuer_not_after = cert.not_valid_after_utc
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self.aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        self.org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)
        self.pen = pen
        self.device_type_oid = x509.ObjectIdentifier(device_type_oid)
        self.hw_type_der = _oid_der(hardware_type_oid)
        self.validity = validity
        self.backdate = backdate
        self.bc = x509.BasicConstraints(ca=False, path_length=None)
        self.ku = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                data_encipherment=False, key_agreement=key_agreement, key_cert_sign=False,
                                crl_sign=False, encipher_only=False, decipher_only=False)
        self.eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
        self.hash = hashes.SHA256()

    def certificate(self, public_key, serial: str, device_type: str, now: datetime) -> x509.Certificate:
        hw_name = _tlv(0x30, self.hw_type_der + _tlv(0x04, serial.encode()))
        san = x509.SubjectAlternativeName([
            x509.OtherName(self.HW_NAME_OID, hw_name),
            x509.UniformResourceIdentifier(f"urn:dev:os:{self.pen}-{serial}"),
        ])
        subject = x509.Name([self.org, x509.NameAttribute(NameOID.COMMON_NAME, f"device-{serial}"),
                             x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
        return (x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(self.issuer_name)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - self.backdate)
                .not_valid_after(min(now + self.validity, self.issuer_not_after))
                .add_extension(self.bc, critical=True)
                .add_extension(self.ku, critical=True)
                .add_extension(self.eku, critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                .add_extension(self.aki, critical=False)
                .add_extension(san, critical=False)
                .add_extension(x509.UnrecognizedExtension(self.device_type_oid,
                                                          _tlv(0x0C, device_type.encode())), critical=False)
                .sign(self.key, self.hash))

    def issue_from_csr(self, csr_der: bytes, serial: str, device_type: str, now: datetime) -> bytes:
        csr = x509.load_der_x509_csr(csr_der)
        if not csr.is_signature_valid:
            raise ValueError("CSR signature does not verify")
        cert = self.certificate(csr.public_key(), serial, device_type, now)
        return cert.public_bytes(serialization.Encoding.DER)


def bare_issuer(data: DataDir, ca, issuer_name: str, profile_name: str) -> BareIssuer:
    issuer = data.issuer(issuer_name)
    profile = ca.profiles[profile_name]
    s = data.config.identity
    return BareIssuer(issuer.cert, issuer.key, organization=s.organization, pen=s.pen,
                      device_type_oid=s.device_type_oid, hardware_type_oid=s.hardware_type_oid,
                      validity=profile.validity, backdate=profile.backdate, key_agreement=profile.key_agreement)


def bare_provision(bare: BareIssuer, *, count: int, device_type: str, out: Path, manufacturing_pem: bytes,
                   root_pem: bytes, prefix: str) -> None:
    """The bare provisioning work: key, factory certificate, the same five files; no registry."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    for n in range(1, count + 1):
        serial = f"{prefix}{n:08d}"
        key = ec.generate_private_key(ec.SECP256R1())
        cert = bare.certificate(key.public_key(), serial, device_type, now)
        der = cert.public_bytes(serialization.Encoding.DER)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        d = out / serial
        d.mkdir()
        _write(d / "key.pem", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()), 0o600)
        _write(d / "cert.pem", cert_pem)
        _write(d / "chain.pem", cert_pem + manufacturing_pem)
        _write(d / "ca.pem", root_pem)
        config = {
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
                "sha256_fingerprint": hashlib.sha256(der).hexdigest(),
                "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        }
        _write(d / "secure-element-config.json", json.dumps(config, indent=2).encode() + b"\n")


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------

def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def make_csr_pool(n: int) -> list[bytes]:
    """n DER CSRs, each with its own P-256 key (built outside any timed region)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")])
    pool = []
    for _ in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
        pool.append(csr.public_bytes(serialization.Encoding.DER))
    return pool


class NullStore:
    """A registry that knows the benchmark's devices and records nothing: what is left of
    issue_operational without it is devid's CA code (parsing, policy, building, signing)."""

    def __init__(self, real, serials: list[str]) -> None:
        self._devices = {s: real.get_device(s) for s in serials}

    def get_device(self, serial: str) -> DeviceRecord | None:
        return self._devices.get(serial)

    def record_certificate(self, cert, *, supersede_profile=None, new_state=None) -> None:
        pass

    def record_for_device(self, device_serial, build, *, supersede_profile=None, new_state=None):
        return build(self._devices[device_serial])      # the device check and build, no recording


def register_devices(ca, n: int, now: datetime, prefix: str = "BENCH") -> list[str]:
    """Register n devices (state manufactured, with a factory certificate) without writing bundles."""
    serials = [f"{prefix}{i:08d}" for i in range(n)]
    pairs = []
    for serial in serials:
        key = ec.generate_private_key(ec.SECP256R1())
        device, issued = ca.new_factory_identity(key.public_key(), serial, DEVICE_TYPE, now)
        pairs.append((device, issued.record))
    ca.store.register_devices(pairs)
    return serials


def _ext_view(cert: x509.Certificate) -> list:
    return [(e.oid.dotted_string, e.critical, e.value) for e in cert.extensions]


def check_equivalent(a: x509.Certificate, b: x509.Certificate, what: str) -> None:
    """The baseline must produce the same certificate as devid, but for serial and signature."""
    problems = []
    for attr in ("subject", "issuer", "not_valid_before_utc", "not_valid_after_utc", "version",
                 "signature_algorithm_oid"):
        va, vb = getattr(a, attr), getattr(b, attr)
        if va != vb:
            problems.append(f"{attr}: {va} != {vb}")
    if a.public_key() != b.public_key():
        problems.append("public key differs")
    if _ext_view(a) != _ext_view(b):
        problems.append(f"extensions differ:\n  devid    {_ext_view(a)}\n  baseline {_ext_view(b)}")
    if problems:
        raise SystemExit(f"{what}: the baseline does not build the same certificate as devid:\n" +
                         "\n".join(problems))


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------

def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(rounds: int, sides: dict[str, Callable[[int], float]], *, slices: int = 1,
               budget: float | None = None, min_rounds: int = 1) -> list[dict[str, float]]:
    """Per round, run every side `slices` times, in short blocks whose order alternates (ABC CBA ...),
    and return each round's seconds per side, summed over its slices. Fine slicing keeps both sides
    of a pair within a fraction of a second of each other, so drift on the machine hits both.

    With a budget (seconds), stop after the round that exhausts it, but not before `min_rounds`.
    Side functions are called with the global slice index (round * slices + slice).
    """
    names = list(sides)
    out = []
    started = time.perf_counter()
    for r in range(rounds):
        totals = dict.fromkeys(names, 0.0)
        for k in range(r * slices, (r + 1) * slices):
            for name in (names if k % 2 == 0 else names[::-1]):
                totals[name] += sides[name](k)
        out.append(totals)
        elapsed = time.perf_counter() - started
        if budget is not None and len(out) >= min_rounds and r + 1 < rounds and \
                elapsed / len(out) * (len(out) + 1) > budget:
            log(f"stopping after {len(out)} of {rounds} rounds: {elapsed:.0f} s spent, budget {budget:g} s")
            break
    return out


def summarise(per_round: list[dict[str, float]], work: int, devid: str = "devid") -> dict:
    """Median rates of each side, and the median of the paired per-round ratios."""
    devid_rates = [work / r[devid] for r in per_round]
    base_rates = [work / r["baseline"] for r in per_round]
    ratios = [r["baseline"] / r[devid] for r in per_round]          # devid rate / baseline rate
    overheads = [r[devid] / r["baseline"] - 1 for r in per_round]   # devid time / baseline time - 1
    return {
        "devid_per_s": statistics.median(devid_rates),
        "baseline_per_s": statistics.median(base_rates),
        "ratio": statistics.median(ratios),
        "overhead": statistics.median(overheads),
        "overhead_min": min(overheads),
        "overhead_max": max(overheads),
        "work_per_round": work,
        "rounds": [{"devid_s": r[devid], "baseline_s": r["baseline"]} for r in per_round],
    }


# --------------------------------------------------------------------------------------------
# the two benchmarks
# --------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.now = utcnow().replace(microsecond=0)
        self.data = DataDir(workdir / "data")
        self.data.init(self.now)
        self.data.require()
        self.registry = self.data.open_registry()
        self.ca = self.data.authority(self.registry)
        self.manufacturing_pem = self.data.cert_pem("manufacturing")
        self.root_pem = self.data.cert_pem("root")
        self.bare_op = bare_issuer(self.data, self.ca, "operational", "operational")
        self.bare_factory = bare_issuer(self.data, self.ca, "manufacturing", "factory")
        self.csrs: list[bytes] = []
        self.devices: list[str] = []

    def close(self) -> None:
        self.registry.close()

    # -- 1. issuance from a CSR -----------------------------------------------------------------

    def setup_issue(self, pool: int) -> None:
        log(f"setup: {pool} CSRs with distinct keys, {pool} registered devices")
        self.csrs = make_csr_pool(pool)
        self.devices = register_devices(self.ca, pool, self.now)
        # equivalence: same CSR, same device -> same certificate but for serial and signature
        issued = self.ca.issue_operational(self.csrs[0], self.devices[0], self.now)
        bare = x509.load_der_x509_certificate(
            self.bare_op.issue_from_csr(self.csrs[0], self.devices[0], DEVICE_TYPE, self.now))
        check_equivalent(issued.cert, bare, "issue_operational")

    def _jobs(self, count: int, start: int) -> list[tuple[bytes, str]]:
        n = len(self.csrs)
        return [(self.csrs[(start + i) % n], self.devices[(start + i) % n]) for i in range(count)]

    def devid_issue(self, jobs: list[tuple[bytes, str]], ca: CertificateAuthority | None = None) -> float:
        issue, now = (ca or self.ca).issue_operational, self.now

        def run() -> None:
            for csr, serial in jobs:
                issue(csr, serial, now)
        return timed(run)

    def bare_issue(self, jobs: list[tuple[bytes, str]]) -> float:
        issue, now = self.bare_op.issue_from_csr, self.now

        def run() -> None:
            for csr, serial in jobs:
                issue(csr, serial, DEVICE_TYPE, now)
        return timed(run)

    def run_issue(self, seconds: float, rounds: int) -> list[dict]:
        """Three sides per round: the baseline, devid, and devid with its registry stubbed out
        (informational: splits devid's overhead into CA code and recording)."""
        stubbed = CertificateAuthority(self.data.issuer, self.ca.profiles, self.ca.settings,
                                       NullStore(self.ca.store, self.devices))
        sides = {
            "baseline": self.bare_issue,
            "devid": lambda jobs: self.devid_issue(jobs, self.ca),
            "devid_stubbed": lambda jobs: self.devid_issue(jobs, stubbed),
        }
        # warm up every path, then calibrate so that all rounds of all sides take `seconds`
        warm = self._jobs(200, 1)
        for fn in sides.values():
            fn(warm)
        per_cert = {name: fn(warm) / len(warm) for name, fn in sides.items()}
        per_slice = max(10, int(seconds / rounds / ISSUE_SLICES / sum(per_cert.values())))
        count = per_slice * ISSUE_SLICES
        log(f"issue: {rounds} rounds x {count} certificates per side, in {ISSUE_SLICES} interleaved slices "
            f"(~{per_cert['devid'] * 1e6:.0f} us/cert for devid, ~{per_cert['baseline'] * 1e6:.0f} for the baseline)")
        per_round = interleave(rounds, {name: (lambda k, fn=fn: fn(self._jobs(per_slice, k * per_slice)))
                                        for name, fn in sides.items()}, slices=ISSUE_SLICES)
        res = {"id": "issue", "operation": "issue_operational from CSR (1 core)", "unit": "certs/s",
               **summarise(per_round, count), "target": f"overhead <= {ISSUE_OVERHEAD_TARGET:.0%}"}
        res["met"] = res["overhead"] <= ISSUE_OVERHEAD_TARGET
        info = {"id": "issue_registry_stubbed", "operation": "  same, registry stubbed (CA code only)",
                "unit": "certs/s",
                **summarise(per_round, count, devid="devid_stubbed"), "target": "(informational)", "met": None}
        log(f"issue: devid {res['devid_per_s']:,.0f}/s baseline {res['baseline_per_s']:,.0f}/s "
            f"overhead {res['overhead']:+.1%}; registry stubbed {info['overhead']:+.1%}")
        return [res, info]

    # -- 2. factory provisioning to disk --------------------------------------------------------

    def devid_provision(self, count: int, out: Path, workers: int | None = None) -> float:
        def run() -> None:
            provision(self.ca, count=count, device_type=DEVICE_TYPE, out=out,
                      manufacturing_pem=self.manufacturing_pem, root_pem=self.root_pem,
                      serial_prefix="PV", now=utcnow, workers=workers)
        return timed(run)

    def bare_provision(self, count: int, out: Path, prefix: str = "BL") -> float:
        return timed(lambda: bare_provision(self.bare_factory, count=count, device_type=DEVICE_TYPE, out=out,
                                            manufacturing_pem=self.manufacturing_pem, root_pem=self.root_pem,
                                            prefix=prefix))

    def _check_provision_equivalent(self) -> None:
        a, b = self.workdir / "check-devid", self.workdir / "check-bare"
        provision(self.ca, count=1, device_type=DEVICE_TYPE, out=a, manufacturing_pem=self.manufacturing_pem,
                  root_pem=self.root_pem, serial_prefix="CHK", now=utcnow)
        bare_provision(self.bare_factory, count=1, device_type=DEVICE_TYPE, out=b,
                       manufacturing_pem=self.manufacturing_pem, root_pem=self.root_pem, prefix="CHK")
        (da,), (db,) = list(a.iterdir()), list(b.iterdir())
        fa, fb = sorted(p.name for p in da.iterdir()), sorted(p.name for p in db.iterdir())
        if fa != fb:
            raise SystemExit(f"provision: baseline writes {fb}, devid writes {fa}")
        ca_cert = x509.load_pem_x509_certificate((da / "cert.pem").read_bytes())
        # same key for the comparison: rebuild the baseline certificate on devid's device key
        key = serialization.load_pem_private_key((da / "key.pem").read_bytes(), None)
        bare = self.bare_factory.certificate(key.public_key(), da.name, DEVICE_TYPE, ca_cert.not_valid_before_utc
                                             + self.bare_factory.backdate)
        check_equivalent(ca_cert, bare, "provision")
        ja = json.loads((da / "secure-element-config.json").read_text())
        jb = json.loads((db / "secure-element-config.json").read_text())
        if ja.keys() != jb.keys() or ja["certificate"].keys() != jb["certificate"].keys():
            raise SystemExit("provision: secure-element-config.json layouts differ")

    def run_provision(self, count: int, rounds: int, budget: float) -> dict:
        # Nothing is deleted until the very end: on ext4 without a journal, creating files soon
        # after deleting many is far slower (see fs_create_probe), which would poison later rounds.
        # Each side of a round is one whole provision() call of `count` identities, as in production.
        self._check_provision_equivalent()
        warm = max(20, min(200, count // 10))
        self.bare_provision(warm, self.workdir / "warm-bare", prefix="WB")
        self.devid_provision(warm, self.workdir / "warm-devid")
        log(f"provision: up to {rounds} rounds x {count} identities per side (budget {budget:g} s, "
            f"at least {min(rounds, MIN_ROUNDS)} rounds)")

        def side(name: str, fn: Callable[[int, Path], float]) -> Callable[[int], float]:
            def run(r: int) -> float:
                seconds = fn(count, self.workdir / f"prov-{name}-{r}")
                _sync()     # this round's writeback must not land in the next round
                return seconds
            return run

        workers = default_workers()
        per_round = interleave(rounds, {"baseline": side("baseline", self.bare_provision),
                                        "devid": side("devid", self.devid_provision),
                                        "devid_1": side("devid1", lambda n, out: self.devid_provision(n, out, 1))},
                               budget=budget, min_rounds=MIN_ROUNDS)
        res = {"id": "provision", "operation": f"provision {count} identities to disk ({workers} workers)",
               "unit": "identities/s", "workers": workers,
               **summarise(per_round, count), "target": f">= {PROVISION_RATE_TARGET:,.0f}/s"}
        res["met"] = res["devid_per_s"] >= PROVISION_RATE_TARGET
        one = {"id": "provision_1_worker", "operation": "  same, 1 process (per-core overhead)",
               "unit": "identities/s", "workers": 1,
               **summarise(per_round, count, devid="devid_1"), "target": "(informational)", "met": None}
        log(f"provision: devid {res['devid_per_s']:,.0f}/s ({workers} workers), {one['devid_per_s']:,.0f}/s "
            f"(1 process), baseline {res['baseline_per_s']:,.0f}/s (1 process)")
        return [res, one]

    # -- profiling ------------------------------------------------------------------------------

    def profile(self, issue_count: int, provision_count: int, top: int) -> str:
        """cProfile of devid's two paths: the top functions by own time, and the cumulative time of
        the devid functions that matter, each as a share of the profiled total.

        cProfile inflates Python-level calls relative to Rust/C ones (it adds a fixed cost per call),
        so read the shares as a ranking; the benchmark's ratios are the figures."""
        buf = io.StringIO()
        jobs = self._jobs(issue_count, 7)
        for title, fn in (
                (f"issue_operational x {issue_count}", lambda: self.devid_issue(jobs)),
                (f"provision x {provision_count}",
                 lambda: self.devid_provision(provision_count, self.workdir / "prof-devid"))):
            prof = cProfile.Profile()
            gc.collect()
            prof.enable()
            fn()
            prof.disable()
            buf.write(format_profile(pstats.Stats(prof), f"devid {title}", top))
        return buf.getvalue()


def _func_name(key: tuple) -> str:
    filename, line, name = key
    if filename == "~":
        return name
    path = Path(filename)
    try:
        where = str(path.relative_to(ROOT))
    except ValueError:
        where = path.name
    if "site-packages" in filename:
        where = filename.split("site-packages/", 1)[1]
    elif "/lib/python" in filename:
        where = "stdlib/" + path.name
    return f"{where}:{line}({name})"


def format_profile(stats: pstats.Stats, title: str, top: int) -> str:
    raw = stats.stats    # {(file, line, func): (cc, ncalls, tottime, cumtime, callers)}
    total = stats.total_tt or 1e-9
    out = [f"\n=== cProfile: {title}: {total:.3f} s profiled ===",
           f"{'own %':>6} {'cum %':>6} {'calls':>8}  function (top {top} by own time)"]
    for key, (cc, nc, tt, ct, callers) in sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]:
        out.append(f"{tt / total:6.1%} {ct / total:6.1%} {nc:8d}  {_func_name(key)}")
    out.append("-- devid functions, cumulative (time inside them, callees included) --")
    own_code = [(key, v) for key, v in raw.items()
                if key[0].startswith(str(ROOT)) and "/benchmarks/" not in key[0]]
    for key, (cc, nc, tt, ct, callers) in sorted(own_code, key=lambda kv: -kv[1][3])[:top]:
        out.append(f"{tt / total:6.1%} {ct / total:6.1%} {nc:8d}  {_func_name(key)}")
    return "\n".join(out) + "\n"


def _sync() -> None:
    if hasattr(os, "sync"):
        os.sync()


def fs_create_probe(parent: Path, files: int = 500) -> float:
    """Microseconds to create, write and close one small file (a new directory every 5 files).

    On ext4 mounted without a journal, the inode allocator skips inodes deleted in the last 60 s
    (360 s while their inode table block is dirty) by scanning past each of them: right after many
    deletions (a previous run's cleanup, someone's test suite) file creation can be 10-50x slower.
    The probe, run at start and end, shows whether that, or any other file system slowness, was
    in play. Its files are left in place until the final cleanup.
    """
    d = Path(tempfile.mkdtemp(prefix="fsprobe-", dir=parent))
    payload = b"x" * 700
    t0 = time.perf_counter()
    for i in range(files):
        if i % 5 == 0:
            sub = d / f"d{i}"
            os.mkdir(sub)
        fd = os.open(sub / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)
    return (time.perf_counter() - t0) / files * 1e6


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

def render_table(results: list[dict], facts: dict, config: dict) -> str:
    head = ("operation", "devid /s", "baseline /s", "ratio", "overhead (min..max)", "rounds", "target", "met?")
    rows = []
    for r in results:
        rows.append((r["operation"], f"{r['devid_per_s']:,.0f}", f"{r['baseline_per_s']:,.0f}",
                     f"{r['ratio']:.3f}",
                     f"{r['overhead']:+.1%} ({r['overhead_min']:+.1%}..{r['overhead_max']:+.1%})",
                     len(r["rounds"]), r["target"], "-" if r["met"] is None else "yes" if r["met"] else "NO"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)   # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append("")
    out.append("ratio = devid rate / baseline rate; overhead = devid time / baseline time - 1;")
    out.append("each a median over interleaved paired rounds (min..max: the spread of the rounds)")
    out.append(f"python {facts['python']} ({facts['python_implementation']}), cryptography {facts['cryptography']}, "
               f"{facts['openssl']}, sqlite {facts['sqlite']}")
    dirty = facts.get("devid_uncommitted") or []
    out.append(f"devid {facts.get('devid_commit')}" + (f" + uncommitted {', '.join(dirty)}" if dirty else ""))
    out.append(f"nproc {facts['nproc']} (cpu_count {facts['cpu_count']}), {facts['cpu']}, {facts['platform']}")
    la_s = facts.get("loadavg_start") or []
    la_e = facts.get("loadavg_end") or []
    out.append(f"workdir fs {facts['workdir_fs']}; load average start {' '.join(f'{x:.2f}' for x in la_s)}, "
               f"end {' '.join(f'{x:.2f}' for x in la_e)}; total {config['elapsed_s']:.1f} s")
    probe = [facts.get("fs_create_us_start"), facts.get("fs_create_us_end")]
    out.append("file create+write+close: " + " / ".join("-" if v is None else f"{v:.0f} us" for v in probe) +
               " (start / end)")
    if any(v is not None and v > SLOW_CREATE_US for v in probe):
        out.append(f"WARNING: file creation is slow here (> {SLOW_CREATE_US} us/file; an idle local disk takes "
                   "~10-20 us): the provisioning rates")
        out.append("measure the file system as much as devid. On ext4 without a journal this follows many recent "
                   "deletions (a test suite,")
        out.append("another run's cleanup): wait a minute and rerun, or compare with --dir /dev/shm (no disk).")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=12.0,
                   help="total measuring time of the issuance benchmark, all sides, all rounds (default 12)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per benchmark (default 5)")
    p.add_argument("--provision-count", type=int, default=2000, metavar="N",
                   help="identities provisioned per side per round (default 2000)")
    p.add_argument("--provision-budget", type=float, default=25.0, metavar="S",
                   help="stop the provisioning rounds early once they would exceed S seconds (a slow file "
                        f"system), after at least {MIN_ROUNDS} rounds (default 25)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--dir", type=Path, default=None,
                   help="parent of the temporary data directory (default: the system temp dir)")
    p.add_argument("--only", choices=("issue", "provision"), help="run one of the two benchmarks")
    p.add_argument("--profile", action="store_true",
                   help="also print a cProfile breakdown of devid's issue_operational and provision (stderr)")
    p.add_argument("--cpu", type=int, default=None, metavar="N",
                   help="pin the process to CPU N (default: let the scheduler choose)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.rounds < 1 or args.seconds <= 0 or args.provision_count < 1:
        p.error("--rounds, --seconds and --provision-count must be positive")

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="devid-bench-", dir=args.dir))
    facts = machine_facts(workdir)
    facts["fs_create_us_start"] = fs_create_probe(workdir)
    os.environ.pop("DEVID_CA_PASSPHRASE", None)     # a generated passphrase in the temp dir
    results = []
    try:
        log(f"workdir {workdir}")
        bench = Bench(workdir)
        try:
            if args.only in (None, "issue"):
                bench.setup_issue(CSR_POOL)
                results.extend(bench.run_issue(args.seconds, args.rounds))
            if args.only in (None, "provision"):
                results.extend(bench.run_provision(args.provision_count, args.rounds, args.provision_budget))
            facts["fs_create_us_end"] = fs_create_probe(workdir)
            if args.profile:
                if not bench.csrs:
                    bench.setup_issue(CSR_POOL)
                log(bench.profile(3000, args.provision_count, 30))
        finally:
            bench.close()
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            log("removing the temporary directory")
            shutil.rmtree(workdir, ignore_errors=True)
            _sync()     # written-back inode tables shorten ext4's recently-deleted window to 60 s
            log("done")

    facts["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    config = {"seconds": args.seconds, "rounds": args.rounds, "provision_count": args.provision_count,
              "provision_budget": args.provision_budget, "cpu": args.cpu, "csr_pool": CSR_POOL,
              "elapsed_s": time.perf_counter() - started,
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if args.json:
        print(json.dumps({"machine": facts, "config": config, "results": results}, indent=2))
    else:
        print(render_table(results, facts, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
