"""Operator API list latency at fleet size (issue 17): p50/p95 of `/api/v1/...` list requests
against a real `devid serve --http` whose registry holds N devices (default 100,000).

    .venv/bin/python benchmarks/bench_api.py [--devices N] [--requests R] [--limit L] [--json] [--keep]

The registry is filled through the registry's own API (`register_devices`, `record_certificates`)
with synthetic rows: every device a factory certificate; every second one enrolled with a current
operational certificate expiring 0..90 days from now (evenly spread); one device in ten a `meter`,
the others `temperature-sensor` (the DER of every row is the gateway's certificate: the list
endpoints do not parse it). The gateway then runs as `devid serve --workers 1 --http`, and one
client on a kept-alive connection sends R requests of each kind, one after the other; the first
of each kind is a warm-up and not counted. Keyset paging is measured by walking: each `devices
walk` request follows the previous one's `next_cursor` (so the pages go deep into the registry).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from devid.ca.identity import fingerprint  # noqa: E402
from devid.ca.store import CertificateRecord, DeviceRecord, DeviceState  # noqa: E402
from devid.gateway.app.datadir import DataDir  # noqa: E402

KINDS = {
    "devices (first page)": "/api/v1/devices?limit={limit}",
    "devices walk (cursor)": None,
    "devices state=enrolled": "/api/v1/devices?state=enrolled&limit={limit}",
    "devices type=meter": "/api/v1/devices?type=meter&limit={limit}",
    "devices expiring_within=30d": "/api/v1/devices?expiring_within=30d&limit={limit}",
    # few matches: the serial-ordered scan checks every device's expiry (the worst case of that filter)
    "devices expiring_within=1h": "/api/v1/devices?expiring_within=1h&limit={limit}",
    "certificates/expiring 30d": "/api/v1/certificates/expiring?within=30d&limit={limit}",
    "attestation-log": "/api/v1/attestation-log?limit={limit}",
}


def fill(data: DataDir, n: int, now: datetime) -> None:
    gw = data.cert("gateway")
    der = gw.public_bytes(serialization.Encoding.DER)
    fp = fingerprint(gw)
    rng = random.Random(17)
    reg = data.open_registry()
    try:
        batch = 5000
        for start in range(0, n, batch):
            pairs, ops = [], []
            for i in range(start, min(n, start + batch)):
                serial = f"BN{i:08d}"
                enrolled = i % 2 == 0
                dtype = "meter" if i % 10 == 3 else "temperature-sensor"
                dev = DeviceRecord(serial, dtype, DeviceState.ENROLLED if enrolled else DeviceState.MANUFACTURED,
                                   now, now, now if enrolled else None)
                pairs.append((dev, CertificateRecord(rng.getrandbits(120), "manufacturing", "factory", serial,
                                                     now, now + timedelta(days=7300), fp, der, now)))
                if enrolled:
                    left = timedelta(seconds=rng.randrange(90 * 86400))
                    ops.append(CertificateRecord(rng.getrandbits(120), "operational", "operational", serial,
                                                 now + left - timedelta(days=90), now + left, fp, der, now))
            reg.register_devices(pairs)
            reg.record_certificates(ops)
            print(f"registry: {min(n, start + batch)}/{n} devices", file=sys.stderr, end="\r", flush=True)
        print(file=sys.stderr)
    finally:
        reg.close()


def serve(data: DataDir, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "DEVID_DATA": str(data.path)}
    with open(log, "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", "127.0.0.1:0",
                                 "--workers", "1", "--http", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=err,
                                env=env, cwd=ROOT)
    url = None
    for _ in range(2):
        line = proc.stdout.readline().decode()
        if "operator listening on " in line:
            url = line.split("listening on ", 1)[1].strip()
        elif "listening" not in line:
            proc.kill()
            raise SystemExit(f"devid serve did not start: {line!r}\n{log.read_text()}")
    return proc, url


def measure(url: str, token: str, requests: int, limit: int) -> dict[str, list[float]]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Authorization": f"Bearer {token}"}

    def get(path: str) -> dict:
        t0 = time.perf_counter()
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        took = (time.perf_counter() - t0) * 1000
        if resp.status != 200:
            raise SystemExit(f"GET {path}: {resp.status} {body[:300]!r}")
        return {"ms": took, "doc": json.loads(body)}

    out: dict[str, list[float]] = {}
    for kind, path in KINDS.items():
        times = []
        cursor = None
        for i in range(requests + 1):
            if path is None:
                p = f"/api/v1/devices?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
            else:
                p = path.format(limit=limit)
            r = get(p)
            cursor = r["doc"].get("next_cursor")
            if i:
                times.append(r["ms"])
        out[kind] = times
    conn.close()
    return out


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=200, help="requests per kind (after one warm-up)")
    ap.add_argument("--limit", type=int, default=50, help="page size of every request")
    ap.add_argument("--dir", help="where the temporary data directory goes")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="devid-bench-api-", dir=args.dir))
    os.environ.pop("DEVID_REGISTRY", None)
    proc = None
    try:
        data = DataDir(tmp / "data")
        now = datetime.now(timezone.utc).replace(microsecond=0)
        data.init(now)
        t0 = time.perf_counter()
        fill(data, args.devices, now)
        filled = time.perf_counter() - t0
        proc, url = serve(data, tmp / "serve.log")
        token = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "operator", "token"], check=True,
                               capture_output=True, env={**os.environ, "DEVID_DATA": str(data.path)}).stdout.decode().strip()
        results = measure(url, token, args.requests, args.limit)
        rows = {k: {"p50_ms": round(statistics.median(v), 2), "p95_ms": round(pct(v, 0.95), 2),
                    "max_ms": round(max(v), 2), "requests": len(v)} for k, v in results.items()}
        doc = {"devices": args.devices, "limit": args.limit, "fill_s": round(filled, 1), "engine": "sqlite",
               "cpus": os.cpu_count(), "results": rows}
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            print(f"{args.devices} devices (SQLite), page size {args.limit}, {args.requests} requests per kind, "
                  "one client, keep-alive")
            print(f"{'request':<32} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
            for k, r in rows.items():
                print(f"{k:<32} {r['p50_ms']:>8} {r['p95_ms']:>8} {r['max_ms']:>8}")
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
            proc.stdout.close()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
