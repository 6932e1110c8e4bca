#!/usr/bin/env python3
"""DTLS handshake benchmark: devid's gateway side by side with libcoap's coap-server-openssl.

Both servers run as separate processes on loopback with the same gateway certificate, and both
authenticate clients with X.509 (PKI mode). The load generator runs in other processes and uses
the same client code against both: a mutual-auth DTLS 1.2 handshake, one CoAP GET of
/.well-known/core, close_notify. Server CPU comes from the server processes' own counters
(/proc/PID/stat utime + stime), so the client's cost is not counted.

    .venv/bin/python benchmarks/bench_dtls.py [--seconds 8] [--rounds 2] [--inflight 16]
                                              [--clients 2] [--sessions 10000] [--json]

Measured:
  full      full handshake + GET: operations/s and server CPU ms per operation
  resumed   the same with session-ticket resumption
  idle      server RSS growth per idle session with --sessions sessions open (devid only)
Rounds alternate devid and libcoap so that machine noise hits both alike; medians are printed
with the ratio devid/libcoap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402

from devid.ca import keys  # noqa: E402
from devid.gateway.app.datadir import DataDir  # noqa: E402
from devid.gateway.dtls import contexts, engine as E  # noqa: E402
from devid.gateway.factory.provisioning import provision  # noqa: E402

COAP_GET_WKC = b"\x40\x01\x00\x00\xbb.well-known\x04core"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the load generator (runs in child processes) --------------------------------------------------

class _Proto(asyncio.DatagramProtocol):
    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.queue.put_nowait(data)


async def _one(ctx, port, session, keep_open=False, timeout=10.0):
    """Handshake + GET (+ close). Returns (ok, tls session, transport kept open or None)."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Proto, remote_addr=("127.0.0.1", port))
    eng = E.ClientEngine(ctx, ("127.0.0.1", port), session=session)
    deadline = loop.time() + timeout
    sent_get = False
    ok = False

    def send(out):
        for _, dg in out.datagrams:
            transport.sendto(dg)

    try:
        send(eng.start(loop.time()))
        while loop.time() < deadline:
            wait = 0.5
            nd = eng.next_deadline()
            if nd is not None:
                wait = max(0.01, min(wait, nd - loop.time()))
            try:
                data = await asyncio.wait_for(proto.queue.get(), wait)
            except asyncio.TimeoutError:
                send(eng.handle_timeouts(loop.time()))
                if eng.state == E.State.CLOSED:
                    break
                continue
            out = eng.receive(data, loop.time())
            send(out)
            if eng.state == E.State.CLOSED:
                break
            if eng.established and not sent_get:
                send(eng.send(COAP_GET_WKC, loop.time()))
                sent_get = True
            if any(isinstance(ev, E.ApplicationData) and ev.data[1:2] == b"\x45" for ev in out.events):
                ok = True
                break
        tls_session = eng.session if ok else None
        if keep_open and ok:
            return ok, tls_session, (transport, eng)
        send(eng.close(loop.time()))
        return ok, tls_session, None
    finally:
        if not (keep_open and ok):
            transport.close()


def _client_ctx(bundle: Path):
    chain = x509.load_pem_x509_certificates((bundle / "chain.pem").read_bytes())
    root = x509.load_pem_x509_certificate((bundle / "ca.pem").read_bytes())
    return contexts.client_context(chain[0], chain[1:], keys.load_plain_key(bundle / "key.pem"), root)


def load_worker(bundles: list[str], port: int, seconds: float, inflight: int, resume: bool, q) -> None:
    async def main():
        ctxs = [_client_ctx(Path(b)) for b in bundles]
        done = failed = 0
        end = time.monotonic() + seconds

        async def lane(i):
            nonlocal done, failed
            ctx = ctxs[i % len(ctxs)]
            session = None
            if resume:   # one full handshake first, outside the count
                _, session, _ = await _one(ctx, port, None)
            while time.monotonic() < end:
                ok, new_session, _ = await _one(ctx, port, session if resume else None)
                if ok:
                    done += 1
                    if resume and new_session is not None:
                        session = new_session
                else:
                    failed += 1
        await asyncio.gather(*(lane(i) for i in range(inflight)))
        return done, failed
    q.put(asyncio.run(main()))


def idle_worker(bundles: list[str], port: int, sessions: int, inflight: int, q, hold: "multiprocessing.Event") -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)

    async def main():
        ctxs = [_client_ctx(Path(b)) for b in bundles]
        kept = []
        sem = asyncio.Semaphore(inflight)

        async def open_one(i):
            async with sem:
                ok, _, pair = await _one(ctxs[i % len(ctxs)], port, None, keep_open=True)
                if ok:
                    kept.append(pair)
        await asyncio.gather(*(open_one(i) for i in range(sessions)))
        q.put(len(kept))
        while not hold.is_set():
            await asyncio.sleep(0.2)
        for transport, _ in kept:
            transport.close()
    asyncio.run(main())


# -- servers -------------------------------------------------------------------------------------

def start_devid(data: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, DEVID_DATA=str(data))
    env.pop("DEVID_CA_PASSPHRASE", None)
    proc = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", f"127.0.0.1:{port}",
                             "--log-level", "WARNING", "--max-sessions", "50000", "--workers", "1",
                             # the idle-memory run opens thousands of sessions from a few bundles
                             "--max-sessions-per-device", "50000",
                             # every client is at 127.0.0.1: one address doing a fleet's handshakes
                             "--handshake-burst-per-address", "1000000", "--handshake-rate-per-address", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    line = proc.stdout.readline().decode()
    if "listening" not in line:
        raise SystemExit(f"devid serve did not start: {line}")
    return proc


def start_libcoap(workdir: Path, data: DataDir, port: int) -> subprocess.Popen:
    binary = shutil.which("coap-server-openssl")
    if binary is None:
        raise SystemExit("coap-server-openssl not found: apt-get install libcoap3-bin")
    gw = data.issuer("gateway")
    (workdir / "gw-chain.pem").write_bytes(data.gateway_chain_path.read_bytes())
    keys.write_private_file(workdir / "gw-key.pem", keys.plain_key(gw.key), exclusive=False)
    trust = workdir / "trust.pem"
    trust.write_bytes(data.cert_pem("root") + data.cert_pem("manufacturing") + data.cert_pem("operational"))
    # libcoap listens for plain CoAP on -p and for DTLS on -p + 1
    proc = subprocess.Popen([binary, "-A", "127.0.0.1", "-p", str(port - 1), "-c", str(workdir / "gw-chain.pem"),
                             "-j", str(workdir / "gw-key.pem"), "-R", str(trust), "-v", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    if proc.poll() is not None:
        raise SystemExit("coap-server-openssl did not start")
    return proc


def run_load(bundles, port, pid, seconds, inflight, clients, resume):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    per = max(1, inflight // clients)
    procs = [ctx.Process(target=load_worker, args=(bundles, port, seconds, per, resume, q)) for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(1.0)                                # spawn + warm-up outside the measurement
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    for p in procs:
        p.join(30)
    done = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    # the workers ran `seconds` after their warm-up; count over the measured wall window
    window = max(t1 - t0, 1e-6)
    return {"ops": done, "failed": failed, "ops_per_s": done / (seconds + 0.0),
            "server_cpu_ms_per_op": (cpu1 - cpu0) * 1000 / done if done else float("nan"),
            "window_s": window}


def measure_idle(bundles, port, pid, sessions, inflight):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    hold = ctx.Event()
    rss0 = rss_kib(pid)
    p = ctx.Process(target=idle_worker, args=(bundles, port, sessions, inflight, q, hold))
    p.start()
    opened = q.get(timeout=sessions / 20 + 120)
    time.sleep(1.0)
    rss1 = rss_kib(pid)
    hold.set()
    p.join(60)
    return {"sessions": opened, "rss_before_kib": rss0, "rss_after_kib": rss1,
            "kib_per_session": (rss1 - rss0) / opened if opened else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each measured run")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, alternating devid and libcoap")
    ap.add_argument("--inflight", type=int, default=16, help="handshakes in flight, over all client processes")
    ap.add_argument("--clients", type=int, default=2, help="load-generating processes")
    ap.add_argument("--sessions", type=int, default=10_000, help="idle sessions for the memory figure (0: skip)")
    ap.add_argument("--devices", type=int, default=32, help="distinct device identities used by the clients")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="devid-bench-dtls-"))
    try:
        data = DataDir(work / "data")
        now = datetime.now(timezone.utc)
        data.init(now)
        reg = data.open_registry()
        provision(data.authority(reg), count=args.devices, device_type="bench-sensor", out=work / "factory",
                  manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"),
                  now=lambda: datetime.now(timezone.utc))
        reg.close()
        bundles = sorted(str(p) for p in (work / "factory").iterdir())
        pa, pb = free_port(), free_port()
        devid = start_devid(data.path, pa)
        libcoap = start_libcoap(work, data, pb)
        results: dict[str, dict[str, list]] = {}
        try:
            for mode in ("full", "resumed"):
                for r in range(args.rounds):
                    order = [("devid", pa, devid), ("libcoap", pb, libcoap)]
                    if r % 2:
                        order.reverse()
                    for name, port, proc in order:
                        res = run_load(bundles, port, proc.pid, args.seconds, args.inflight, args.clients,
                                       mode == "resumed")
                        results.setdefault(mode, {}).setdefault(name, []).append(res)
                        if not args.json:
                            print(f"  {mode:<8} round {r + 1} {name:<8} {res['ops_per_s']:8.1f} ops/s "
                                  f"{res['server_cpu_ms_per_op']:6.3f} ms server CPU/op  ({res['failed']} failed)",
                                  file=sys.stderr)
            idle = measure_idle(bundles, pa, devid.pid, args.sessions, 32) if args.sessions else None
        finally:
            for proc in (devid, libcoap):
                proc.send_signal(signal.SIGTERM)
            for proc in (devid, libcoap):
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()

        def med(mode, name, key):
            return statistics.median(x[key] for x in results[mode][name])

        summary = {
            "machine": {"python": platform.python_version(), "nproc": os.cpu_count(),
                        "openssl(pyOpenSSL)": __import__("OpenSSL").SSL.OpenSSL_version(0).decode()},
            "settings": vars(args),
        }
        for mode in ("full", "resumed"):
            d_ops, l_ops = med(mode, "devid", "ops_per_s"), med(mode, "libcoap", "ops_per_s")
            d_cpu, l_cpu = med(mode, "devid", "server_cpu_ms_per_op"), med(mode, "libcoap", "server_cpu_ms_per_op")
            summary[mode] = {"devid_ops_per_s": round(d_ops, 1), "libcoap_ops_per_s": round(l_ops, 1),
                             "ratio_ops": round(d_ops / l_ops, 3) if l_ops else float("nan"),
                             "devid_server_cpu_ms": round(d_cpu, 3), "libcoap_server_cpu_ms": round(l_cpu, 3),
                             "ratio_cpu": round(d_cpu / l_cpu, 3) if l_cpu == l_cpu and l_cpu else float("nan"),
                             "failed": sum(x["failed"] for n in results[mode] for x in results[mode][n])}
        if idle:
            summary["idle"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in idle.items()}
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"\nDTLS 1.2 mutual auth, handshake + CoAP GET, {args.inflight} in flight from "
                  f"{args.clients} client processes; medians of {args.rounds} rounds")
            print(f"{'':<10}{'devid ops/s':>12}{'libcoap ops/s':>15}{'ratio':>7}   "
                  f"{'devid CPU ms':>13}{'libcoap CPU ms':>15}{'ratio':>7}")
            for mode in ("full", "resumed"):
                s = summary[mode]
                print(f"{mode:<10}{s['devid_ops_per_s']:>12}{s['libcoap_ops_per_s']:>15}{s['ratio_ops']:>7}   "
                      f"{s['devid_server_cpu_ms']:>13}{s['libcoap_server_cpu_ms']:>15}{s['ratio_cpu']:>7}")
            print("target: devid server CPU per full handshake <= 0.8 ms")
            if idle:
                print(f"idle sessions: {idle['sessions']} open, server RSS {idle['rss_before_kib']} -> "
                      f"{idle['rss_after_kib']} KiB: {idle['kib_per_session']:.1f} KiB per session "
                      f"(target <= 30 KiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
