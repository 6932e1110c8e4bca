#!/usr/bin/env python3
"""Evidence verification throughput of devid, side by side with a bare cbor2 + cryptography check.

    .venv/bin/python benchmarks/bench_attestation.py [--tokens N] [--rounds R] [--json]

One core, one process. Every side works through the same pool of N tokens (distinct nonces,
distinct devices' keys are not needed: one P-256 key, as in the bare check) once per round;
rounds are interleaved (the order alternates) and each figure is the median over the rounds;
ratios are medians of the per-round paired ratios. Shared machines are noisy: read the ratios.

Sides:
- baseline: cbor2.loads of the token, Sig_structure with cbor2.dumps, one ECDSA P-256 verify
  (cryptography), cbor2.loads of the payload. No strictness, no claim checks, no policy.
- devid: `Verifier.appraise`: strict decoding (size cap, nesting, duplicates, trailing bytes),
  COSE_Sign1 structure and algorithm, the signature, every claim's type, the nonce consumed
  (in-memory store), and the full policy (reference values, minimum version, boot, debug, skew).
- devid-cwt (for the record): devid's strict decoding and claim checks, but the signature
  checked by the `cwt` library (COSE.decode on the strictly decoded tag) instead of our
  Sig_structure + cryptography. Not used by devid; shows what cwt would cost.
- devid+sqlite (with --sqlite): `AttestationService.evaluate` on a real SQLite registry: the
  nonce consumed by compare-and-swap and the verdict appended to the hash-chained log, each in
  its own transaction. Informational: it measures the disk too.

Target: devid >= 8,000 verifications/s on one core (on the reference machine of
/work/shared/design/performance-facts.md, where ECDSA verify alone is 16,100/s).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import cbor2
import cryptography
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devid.attestation.evidence import Evidence, decode_claims, fw_digest_of, parse_sign1, sign_evidence  # noqa: E402
from devid.attestation.nonces import MemoryNonceStore, NonceRecord, NonceService  # noqa: E402
from devid.attestation.policy import Tier, parse_policy  # noqa: E402
from devid.attestation.service import AttestationService  # noqa: E402
from devid.attestation.verifier import AttestingDevice, Verifier  # noqa: E402

TARGET = 8000.0
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
IMAGE = b"ts-firmware 2.3.1 image"
POLICY = parse_policy(f"""
version = 1
[settings]
oemid = 32473
[device_types.temperature-sensor]
minimum_firmware_version = "2.1.0"
[[device_types.temperature-sensor.firmware]]
name = "ts-firmware"
version = "2.2.0"
digest = "sha-256:{fw_digest_of(b'old').hex()}"
deprecated = true
[[device_types.temperature-sensor.firmware]]
name = "ts-firmware"
version = "2.3.1"
digest = "sha-256:{fw_digest_of(IMAGE).hex()}"
""", "bench-policy")
_ECDSA = ec.ECDSA(hashes.SHA256())


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_tokens(key, n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        nonce = i.to_bytes(4, "big") + os.urandom(12)
        ev = Evidence(nonce=nonce, ueid=b"\x01" + bytes(16), oemid=32473, hwmodel=b"temperature-sensor",
                      swname="ts-firmware", swversion="2.3.1", fw_alg="sha-256", fw_digest=fw_digest_of(IMAGE),
                      secure_boot=True, dbgstat=3, bootcount=12, iat=int(NOW.timestamp()), swversion_scheme=1)
        out.append((nonce, sign_evidence(ev, key)))
    return out


def bare_verify(token: bytes, public_key) -> dict:
    protected, _unprotected, payload, sig = cbor2.loads(token).value
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
    public_key.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")),
                      to_be_signed, _ECDSA)
    return cbor2.loads(payload)


class Sides:
    def __init__(self, tokens, key, workdir: Path | None) -> None:
        self.tokens = tokens
        self.pub = key.public_key()
        self.device = AttestingDevice("TS1", "temperature-sensor", "ab" * 32, self.pub)
        self.workdir = workdir
        from cwt import COSE, COSEKey
        self.cose = COSE.new()
        self.cose_key = COSEKey.from_pem(self.pub.public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo), alg=-7)
        self._round = 0

    def _nonce_store(self) -> MemoryNonceStore:
        store = MemoryNonceStore()
        for nonce, _ in self.tokens:
            store.put_nonce(NonceRecord(nonce, "TS1", "ab" * 32, NOW, NOW + POLICY.nonce_lifetime), purge_before=NOW)
        return store

    @staticmethod
    def _timed(fn) -> float:
        gc.collect()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def baseline(self) -> float:
        pub, tokens = self.pub, self.tokens

        def run():
            for _, token in tokens:
                bare_verify(token, pub)
        return self._timed(run)

    def devid(self) -> float:
        verifier = Verifier(POLICY, NonceService(self._nonce_store(), clock=lambda: NOW), clock=lambda: NOW)
        appraise, device, tokens, affirming = verifier.appraise, self.device, self.tokens, Tier.AFFIRMING
        bad = []

        def run():
            for _, token in tokens:
                verdict = appraise(token, device, NOW).verdict
                if verdict.tier is not affirming:
                    bad.append(verdict.codes)
        seconds = self._timed(run)
        if bad:
            raise SystemExit(f"devid side did not affirm: {bad[:3]}")
        return seconds

    def devid_cwt(self) -> float:
        cose, key, tokens = self.cose, self.cose_key, self.tokens
        from cbor2 import CBORTag

        def run():
            for _, token in tokens:
                s = parse_sign1(token)
                cose.decode(CBORTag(18, [s.protected, s.unprotected, s.payload, s.signature]), key)
                decode_claims(s.payload)
        return self._timed(run)

    def devid_sqlite(self) -> float:
        from devid.gateway.store.attestation_store import AttestationStore
        from devid.gateway.store.registry import SQLiteRegistry
        self._round += 1
        reg = SQLiteRegistry(self.workdir / f"r{self._round}.sqlite3", create=True)
        try:
            store = AttestationStore(reg)
            for nonce, _ in self.tokens:
                store.put_nonce(NonceRecord(nonce, "TS1", "ab" * 32, NOW, NOW + POLICY.nonce_lifetime),
                                purge_before=NOW)
            svc = AttestationService(POLICY, store, store, clock=lambda: NOW)
            evaluate, device, tokens = svc.evaluate, self.device, self.tokens

            def run():
                for _, token in tokens:
                    evaluate(token, device)
            return self._timed(run)
        finally:
            reg.close()


def machine_facts() -> dict:
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        openssl = backend.openssl_version_text()
    except Exception:                                      # pragma: no cover - informational
        openssl = "unknown"
    import cwt
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")
    except OSError:
        pass
    return {"python": platform.python_version(), "cryptography": cryptography.__version__,
            "cbor2": getattr(cbor2, "__version__", None) or _dist_version("cbor2"), "cwt": cwt.__version__,
            "openssl": openssl, "cpu": cpu, "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=3000, help="tokens per side per round (default 3000)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--sqlite", action="store_true", help="also measure evaluate() with the SQLite nonce store and log")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.tokens < 10 or args.rounds < 1:
        p.error("--tokens >= 10 and --rounds >= 1")
    started = time.perf_counter()
    facts = machine_facts()
    key = ec.generate_private_key(ec.SECP256R1())
    log(f"signing {args.tokens} tokens")
    tokens = make_tokens(key, args.tokens)
    log(f"token size {len(tokens[0][1])} bytes")
    workdir = Path(tempfile.mkdtemp(prefix="devid-bench-attest-"))
    try:
        sides = Sides(tokens, key, workdir)
        order = {"baseline": sides.baseline, "devid": sides.devid, "devid-cwt": sides.devid_cwt}
        if args.sqlite:
            order["devid+sqlite"] = sides.devid_sqlite
        for fn in order.values():      # warm-up
            fn()
        per_round = []
        names = list(order)
        for r in range(args.rounds):
            seq = names if r % 2 == 0 else names[::-1]
            per_round.append({n: order[n]() for n in seq})
            log(f"round {r + 1}: " + ", ".join(f"{n} {args.tokens / per_round[-1][n]:,.0f}/s" for n in names))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = {}
    for n in names:
        rates = [args.tokens / r[n] for r in per_round]
        ratios = [r["baseline"] / r[n] for r in per_round]
        results[n] = {"per_s": statistics.median(rates), "us": 1e6 / statistics.median(rates),
                      "ratio_to_baseline": statistics.median(ratios), "min_per_s": min(rates),
                      "max_per_s": max(rates)}
    facts["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    config = {"tokens": args.tokens, "rounds": args.rounds, "token_bytes": len(tokens[0][1]),
              "elapsed_s": time.perf_counter() - started, "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if args.json:
        print(json.dumps({"machine": facts, "config": config, "results": results}, indent=2))
        return 0
    head = ("side", "verifications/s", "us each", "ratio to baseline", "min..max /s")
    rows = [(n, f"{r['per_s']:,.0f}", f"{r['us']:.1f}", f"{r['ratio_to_baseline']:.3f}",
             f"{r['min_per_s']:,.0f}..{r['max_per_s']:,.0f}") for n, r in results.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for i, row in enumerate([head, tuple("-" * w for w in widths), *rows]):
        print("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
    d = results["devid"]
    print(f"\ndevid target >= {TARGET:,.0f}/s on one core: {'met' if d['per_s'] >= TARGET else 'NOT met'} here "
          f"({d['per_s']:,.0f}/s); ratio = baseline time / side time, median of {args.rounds} interleaved rounds")
    print(f"python {facts['python']}, cryptography {facts['cryptography']}, cbor2 {facts['cbor2']}, cwt {facts['cwt']}, "
          f"{facts['openssl']}; {facts['cpu']}, nproc {facts['nproc']}; load {facts['loadavg_start']} -> "
          f"{facts['loadavg_end']}; {config['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
