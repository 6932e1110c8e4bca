"""The two benchmarks of bench_issuance.py on a real data directory: issue_operational from a CSR
against the bare baseline (and with the registry stubbed out), provision() to disk against the
bare provisioning; their setup, the check that both sides build the same certificate, and the
cProfile run of devid's two paths."""

from __future__ import annotations

import cProfile
import gc
import io
import json
import pstats
from datetime import datetime
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from issuance_base import DEVICE_TYPE, ISSUE_OVERHEAD_TARGET, ISSUE_SLICES, MIN_ROUNDS, PROVISION_RATE_TARGET, \
    log, sync, utcnow
from issuance_baseline import bare_issuer, bare_provision
from issuance_measure import interleave, summarise, timed
from issuance_report import format_profile

from devid.ca.authority import CertificateAuthority
from devid.ca.store import DeviceRecord
from devid.gateway.app.datadir import DataDir
from devid.gateway.factory.provisioning import default_workers, provision


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
                sync()     # this round's writeback must not land in the next round
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
