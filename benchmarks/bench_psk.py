#!/usr/bin/env python3
"""Server CPU per PSK handshake against an X.509 handshake, in one run, on one engine (issue 18).

    .venv/bin/python benchmarks/bench_psk.py [--handshakes 300] [--rounds 5] [--json]

One devid ServerEngine with the gateway's Context (certificate suites and
TLS_PSK_WITH_AES_128_CCM_8) and both authenticators, a client object passing datagrams in memory
(no sockets). Only the server's work is timed (process CPU time around each server call):

  x509   mutual-auth ECDHE-ECDSA (P-256) with a factory certificate: cookie exchange, OpenSSL's
         chain check, the registry match (one query), exporter, record-layer takeover
  psk    PSK-AES128-CCM8 with a factory PSK (`devid provision --psk`): cookie exchange, the PSK
         lookup (the device's certificates and its standing: two queries; the key derived with
         HKDF-SHA256), exporter, record-layer takeover. No ECDHE, no signature: RFC 7925's PSK
         suite has no forward secrecy, which is what makes it cheap

Rounds alternate the order; medians are reported with the ratio psk/x509. Each handshake comes
from its own address (a fleet), and the session is closed after it.
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from OpenSSL import SSL  # noqa: E402

from devid.ca import keys  # noqa: E402
from devid.gateway.app.datadir import DataDir  # noqa: E402
from devid.gateway.dtls import contexts, engine as E  # noqa: E402
from devid.gateway.factory.provisioning import provision  # noqa: E402
from devid.gateway.service.identity import DeviceAuthenticator, PskDeviceAuthenticator  # noqa: E402


def setup(work: Path):
    data = DataDir(work / "data")
    now = lambda: datetime.now(timezone.utc)  # noqa: E731
    data.init(now())
    reg = data.open_registry()
    secret = data.psk_secret(create=True)
    provision(data.authority(reg), count=4, device_type="bench", out=work / "f", workers=1, psk_secret=secret,
              manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"), now=now)
    gw = data.issuer("gateway")
    mfg, op = data.cert("manufacturing"), data.cert("operational")
    bundle = sorted((work / "f").iterdir())[0]
    chain = x509.load_pem_x509_certificates((bundle / "chain.pem").read_bytes())
    x509_ctx = contexts.client_context(chain[0], chain[1:], keys.load_plain_key(bundle / "key.pem"),
                                       data.cert("root"))
    psk = ((bundle / "psk-identity.txt").read_bytes(), (bundle / "psk-key.txt").read_bytes())
    ctx = contexts.server_context(gw.cert, [op], gw.key, [mfg, op], [mfg, op], psk=True)
    psk_auth = PskDeviceAuthenticator(reg, lambda: secret)
    psk_auth.load_now()                 # as the gateway does at start
    engine = E.ServerEngine(ctx, DeviceAuthenticator(mfg, op, data.config.identity, reg, now), psk=psk_auth)
    return engine, x509_ctx, contexts.psk_client_context(), psk


def one(engine, client: E.ClientEngine, i: int, want: str) -> float:
    peer = (f"10.0.{(i >> 8) & 255}.{i & 255}", 10000 + (i & 1023))
    pending = [dg for _, dg in client.start(0.0).datagrams]
    spent = 0.0
    while pending:
        dg = pending.pop(0)
        t = time.process_time()
        out = engine.receive(peer, dg, 0.0)
        spent += time.process_time() - t
        for _, reply in out.datagrams:
            pending.extend(d for _, d in client.receive(reply, 0.0).datagrams)
    assert client.established and want in client.cipher, (client.closed_reason, client.cipher)
    t = time.process_time()
    engine.close(peer, 0.0)
    return spent + time.process_time() - t


def run(engine, make_client, n: int, want: str, offset: int) -> float:
    return sum(one(engine, make_client(), offset + i, want) for i in range(n)) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--handshakes", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="devid-bench-psk-"))
    try:
        engine, x509_ctx, psk_ctx, psk = setup(work)
        clients = {"x509": (lambda: E.ClientEngine(x509_ctx, "gw"), "ECDHE-ECDSA"),
                   "psk": (lambda: E.ClientEngine(psk_ctx, "gw", psk=psk), "PSK-AES128-CCM8")}
        for name, (make, want) in clients.items():            # warm-up
            run(engine, make, 20, want, 0)
        res: dict[str, list[float]] = {"x509": [], "psk": []}
        for r in range(args.rounds):
            for name in (["x509", "psk"] if r % 2 == 0 else ["psk", "x509"]):
                make, want = clients[name]
                res[name].append(run(engine, make, args.handshakes, want, r * args.handshakes))
        med = {k: statistics.median(v) * 1000 for k, v in res.items()}
        summary = {
            "machine": {"python": platform.python_version(), "nproc": os.cpu_count(),
                        "openssl": SSL.OpenSSL_version(0).decode()},
            "handshakes": args.handshakes, "rounds": args.rounds,
            "server_cpu_ms_per_handshake": {k: round(v, 3) for k, v in med.items()},
            "ratio_psk_to_x509": round(med["psk"] / med["x509"], 3),
        }
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"server CPU per DTLS 1.2 handshake on one devid engine, in memory; medians of {args.rounds} "
                  f"rounds of {args.handshakes}")
            print(f"  X.509 (ECDHE-ECDSA, mutual)   {med['x509']:.3f} ms")
            print(f"  PSK (PSK-AES128-CCM8)         {med['psk']:.3f} ms   ratio psk/x509 "
                  f"{summary['ratio_psk_to_x509']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
