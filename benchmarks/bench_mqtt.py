"""`devid bench --mqtt` (issue 16): TLS connects per second against a real Mosquitto broker with
devid's operational certificates, side by side with devid's own DTLS handshakes per second
against `devid serve`, in one run.

Set-up (untimed): a data directory of its own, `--devices` devices (default 20) provisioned and
enrolled through a real `devid serve --workers N` by the lean load generator (the zero-touch
flow, which saves each device's operational identity: op-chain.pem, op-key.pem); then
`devid mqtt broker-config` for a listener on 127.0.0.1 (host name localhost) and Mosquitto
started on its files as the `mosquitto` user with setpriv, in the foreground (as
tests/mosquitto_helpers.py does: so the pid is the broker's and its CPU is read from /proc). The
gateway that enrolled the devices stays up for the DTLS side.

Then `--rounds` rounds (default 2) of the two sides in alternating order (A B, B A, ...), each
`--seconds` long (default 5) with `--concurrency` operations in flight from `--clients` client
processes (spawned per side and round; they load the identities and wait, and the clock starts when
all of them are ready). Every operation uses one of the enrolled devices' operational identities,
taking turns, and is a full handshake (no session resumption on either side):

  mqtt   TCP connect, TLS 1.2 handshake with the device's operational certificate (the broker
         requires and verifies it against its trust anchor and the CRL), MQTT 5 CONNECT (clean
         start, a client id of its own per lane), CONNACK (reason code 0 checked), DISCONNECT,
         close. The client is a few lines over blocking `ssl` sockets, one thread per lane: the
         handshake runs inside OpenSSL with the GIL released, so the client costs little Python
         per connect (asyncio's SSL transport drives OpenSSL's memory BIOs from Python code, and
         paho-mqtt adds its own loop and packet objects, both on the machine the broker shares).
  dtls   the handshake of bench_dtls.py's load generator (`bench_dtls._one`: a mutual-auth DTLS
         1.2 handshake on the sans-I/O engine, one CoAP GET of /.well-known/core, close_notify)
         with the same operational identities, against the gateway (it checks the certificate's
         chain and the device's status in the registry).

Both are the same shape: handshake, one request and its answer, close. Figures per side and
round: operations/s over the window (from the start signal until every client is done), the
server processes' CPU per operation (/proc/PID/stat utime + stime: the broker; the gateway's
parent and workers), and the clients' CPU per operation; per round the ratios devid / mosquitto,
reported as the median of the paired per-round ratios with their range.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import bench_cli
from bench_clients import run_clients
from bench_common import (DEVICE_TYPE, bench_policy, bundle_dirs, cpu_seconds, program, start_gateway, start_mosquitto,
                          stop_process)

SIDES = ("mqtt", "dtls")
NAMES = {"mqtt": "mosquitto", "dtls": "devid"}
DEFAULT_DEVICES, DEFAULT_SECONDS = 20, 5.0
HOSTNAME = "localhost"        # the broker certificate's name; the broker listens on 127.0.0.1
KEYS = ("per_s", "server_cpu_ms_per_op", "client_cpu_ms_per_op")


def check(ap, args) -> None:
    """What --mqtt cannot be combined with, and what it needs on this machine."""
    if args.seconds is not None and not args.mqtt:
        ap.error("--seconds is a size of --mqtt: use them together")
    if not args.mqtt:
        return
    for flag in ("gateway", "durability", "flood", "workers_scaling", "registry", "pkcs11", "renew", "sql_cost"):
        if getattr(args, flag):
            ap.error(f"--mqtt makes its own data directory, gateway and broker: leave out --{flag.replace('_', '-')}")
    if args.seconds is not None and args.seconds <= 0:
        ap.error("--seconds must be more than 0")
    for name in ("mosquitto", "setpriv"):
        if program(name) is None:
            ap.error(f"--mqtt needs {name} (Debian's mosquitto and util-linux; ./scripts/setup --test "
                     "installs them)")
    if os.geteuid() != 0:
        ap.error("--mqtt starts Mosquitto as the mosquitto user with setpriv: run it as root")


def now() -> datetime:
    return datetime.now(timezone.utc)


def devid_cmd() -> list[str]:
    return [sys.executable, "-m", "devid.gateway.cli"]


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the broker ------------------------------------------------------------------------------------------

class Broker:
    """Mosquitto on the files `devid mqtt broker-config` wrote into a directory of its own (outside
    the run's 0700 scratch directory, which the mosquitto user could not enter): in the temporary
    directory if the mosquitto user can reach it, else in /tmp."""

    def __init__(self) -> None:
        base = Path(tempfile.gettempdir()).resolve()
        if not all(p.stat().st_mode & 0o001 for p in (base, *base.parents)):
            base = Path("/tmp")
        self.directory = Path(tempfile.mkdtemp(prefix="devid-bench-mosquitto-", dir=base))
        os.chmod(self.directory, 0o755)
        self.port = free_tcp_port()
        self.log = self.directory / "broker.log"
        self.proc: subprocess.Popen | None = None

    def configure(self, data_path: Path) -> dict:
        import json
        proc = subprocess.run([*devid_cmd(), "mqtt", "broker-config", "--out", str(self.directory), "--hostname",
                               HOSTNAME, "--port", str(self.port), "--listen", "127.0.0.1", "--owner", "mosquitto",
                               "--json"], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, DEVID_DATA=str(data_path)))
        if proc.returncode != 0:
            raise SystemExit(f"devid mqtt broker-config failed: {_last_line(proc.stderr, proc.returncode)}")
        return json.loads(proc.stdout)

    def start(self) -> None:
        try:
            self.proc = start_mosquitto(self.directory / "mosquitto.conf", self.port, self.log)
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from None

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace").strip()[-500:]

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.directory, ignore_errors=True)


def _last_line(text: str, code: int) -> str:
    return (text.strip().splitlines() or [f"exit {code}"])[-1]


def mosquitto_version() -> str | None:
    try:
        out = subprocess.run([program("mosquitto") or "mosquitto", "-h"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.strip() for line in out.stdout.splitlines() if "version" in line), None)


# -- the clients (spawned processes) ---------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_connect(client_id: str, keepalive: int = 60) -> bytes:
    """An MQTT 5 CONNECT: clean start, no will, no user name or password, no properties."""
    cid = client_id.encode()
    body = (b"\x00\x04MQTT\x05\x02" + keepalive.to_bytes(2, "big") + b"\x00"
            + len(cid).to_bytes(2, "big") + cid)
    return b"\x10" + _varint(len(body)) + body


DISCONNECT = b"\xe0\x00"          # MQTT 5 DISCONNECT, reason 0 (normal), no properties


def _read_exactly(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the broker closed the connection before CONNACK")
        buf += chunk
    return buf


def _connack(sock) -> int:
    """The CONNACK's reason code (MQTT 5: 0 is success)."""
    first = _read_exactly(sock, 1)[0]
    length, shift = 0, 0
    while True:
        byte = _read_exactly(sock, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    body = _read_exactly(sock, length)
    if first != 0x20 or length < 2:
        raise ConnectionError(f"not a CONNACK: packet type {first >> 4}")
    return body[1]


def _mqtt_contexts(bundles: list[str]):
    import ssl
    out = []
    for b in bundles:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(Path(b) / "ca.pem"))          # the root: the broker's chain ends there
        ctx.load_cert_chain(str(Path(b) / "op-chain.pem"), str(Path(b) / "op-key.pem"))
        out.append((Path(b).name, ctx))
    return out


def mqtt_worker(bundles: list[str], port: int, seconds: float, lanes: int, offset: int, q, go) -> None:
    import threading
    identities = _mqtt_contexts(bundles)
    counts = {"done": 0, "failed": 0}
    first: list[str] = []
    ciphers: list = []
    lock = threading.Lock()
    q.put(("ready", None))
    go.wait()
    cpu0, end = time.process_time(), time.monotonic() + seconds

    def lane(i: int) -> None:
        k = 0
        while time.monotonic() < end:
            serial, ctx = identities[(offset + i + k * lanes) % len(identities)]
            k += 1
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    with ctx.wrap_socket(raw, server_hostname=HOSTNAME) as s:
                        s.sendall(mqtt_connect(f"{serial}-b{offset + i}"))
                        code = _connack(s)
                        if code != 0:
                            raise ConnectionError(f"CONNACK reason code 0x{code:02x}")
                        s.sendall(DISCONNECT)
                        if not ciphers:
                            ciphers.append(s.cipher())
                ok = True
            except (OSError, ConnectionError) as exc:
                ok = False
                if not first:
                    first.append(f"{serial}: {exc}")
            with lock:
                counts["done" if ok else "failed"] += 1

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put(("done", {**counts, "cpu": time.process_time() - cpu0, "first_failure": first[0] if first else None,
                    "cipher": list(ciphers[0]) if ciphers else None}))


def dtls_worker(bundles: list[str], port: int, seconds: float, lanes: int, offset: int, q, go) -> None:
    import asyncio

    from cryptography import x509

    import bench_dtls
    from devid.ca import keys
    from devid.gateway.dtls import contexts

    def context(b: Path):
        chain = x509.load_pem_x509_certificates((b / "op-chain.pem").read_bytes())
        root = x509.load_pem_x509_certificate((b / "ca.pem").read_bytes())
        return contexts.client_context(chain[0], chain[1:], keys.load_plain_key(b / "op-key.pem"), root)

    identities = [(Path(b).name, context(Path(b))) for b in bundles]
    q.put(("ready", None))
    go.wait()

    async def main():
        counts = {"done": 0, "failed": 0}
        first: list[str] = []
        end = time.monotonic() + seconds

        async def lane(i: int) -> None:
            k = 0
            while time.monotonic() < end:
                serial, ctx = identities[(offset + i + k * lanes) % len(identities)]
                k += 1
                try:
                    ok, _, _ = await bench_dtls._one(ctx, port, None)
                except Exception as exc:            # a load generator reports, it does not crash
                    ok = False
                    first.append(f"{serial}: {exc!r}")
                if not ok and not first:
                    first.append(f"{serial}: no 2.05 answer to the GET after the handshake")
                counts["done" if ok else "failed"] += 1
        await asyncio.gather(*(lane(i) for i in range(lanes)))
        return counts, first
    cpu0 = time.process_time()
    counts, first = asyncio.run(main())
    q.put(("done", {**counts, "cpu": time.process_time() - cpu0, "first_failure": first[0] if first else None}))


def measure(side: str, bundles: list[str], port: int, pids: list[int], seconds: float, clients: int,
            inflight: int) -> dict:
    """One side for `seconds`: operations/s, server CPU (the `pids`) and client CPU per operation."""
    import multiprocessing
    import queue
    ctx = multiprocessing.get_context("spawn")
    q, go = ctx.Queue(), ctx.Event()
    per = max(1, inflight // clients)
    target = mqtt_worker if side == "mqtt" else dtls_worker
    procs = [ctx.Process(target=target, args=(bundles, port, seconds, per, c * per, q, go)) for c in range(clients)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            kind, _ = q.get(timeout=300)
            if kind != "ready":
                raise SystemExit(f"a {side} client process failed to start")
        cpu0, t0 = cpu_seconds(pids), time.perf_counter()
        go.set()
        results = [q.get(timeout=seconds + 300)[1] for _ in procs]
        wall, cpu1 = time.perf_counter() - t0, cpu_seconds(pids)
    except queue.Empty:
        raise SystemExit(f"the {side} client processes did not answer") from None
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    done, failed = sum(r["done"] for r in results), sum(r["failed"] for r in results)
    out = {"done": done, "failed": failed, "seconds": round(wall, 3),
           "per_s": round(done / wall, 1) if done else None,
           "server_cpu_ms_per_op": round((cpu1 - cpu0) * 1000 / done, 3) if done else None,
           "client_cpu_ms_per_op": round(sum(r["cpu"] for r in results) * 1000 / done, 3) if done else None}
    firsts = [r["first_failure"] for r in results if r.get("first_failure")]
    if firsts:
        out["first_failure"] = firsts[0]
    cipher = next((r["cipher"] for r in results if r.get("cipher")), None)
    if cipher:
        out["tls"] = {"cipher": cipher[0], "version": cipher[1]}
    return out


# -- the run ---------------------------------------------------------------------------------------------

def prepare(args, work: Path, broker_port: int, report):
    """A data directory whose devices' type names the broker, and `args.devices` devices
    provisioned into work/factory; the data directory and the bundles."""
    from devid.gateway.app.datadir import DataDir
    from devid.gateway.factory.provisioning import provision
    from devid.gateway.store.configuration import DEFAULT_TEMPLATE
    data = DataDir(work / "data")
    report.stage(f"creating a CA in {data.path}, provisioning {args.devices} devices")
    data.init(now())
    (data.path / "attestation-policy.toml").write_text(bench_policy())
    (data.path / "config").mkdir(exist_ok=True)
    (data.path / "config" / "default.toml").write_text(
        DEFAULT_TEMPLATE + f'\n[mqtt]\nbroker = "mqtts://{HOSTNAME}:{broker_port}"\ntopics = ["devices/{{serial}}/#"]\n')
    registry = data.open_registry()
    try:
        provision(data.authority(registry), count=args.devices, device_type=DEVICE_TYPE, out=work / "factory",
                  manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"),
                  serial_prefix=f"M{os.getpid()}x", now=now, workers=1)
    finally:
        registry.close()
    return data, bundle_dirs(work / "factory")


def paired(rounds: list[dict], key: str) -> dict | None:
    """dtls / mqtt per round (both ran in the same round): median, min and max."""
    pairs = [r["dtls"][key] / r["mqtt"][key] for r in rounds if r["dtls"].get(key) and r["mqtt"].get(key)]
    if not pairs:
        return None
    return {"median": round(statistics.median(pairs), 3), "min": round(min(pairs), 3), "max": round(max(pairs), 3)}


def medians(rounds: list[dict]) -> dict:
    def med(side, key):
        values = [r[side][key] for r in rounds if r[side].get(key) is not None]
        return round(statistics.median(values), 3) if values else None
    return {side: {k: med(side, k) for k in KEYS} for side in SIDES}


def _ratio(x: dict | None) -> str:
    return "-" if x is None else f"{x['median']:.3f} ({x['min']:.3f}..{x['max']:.3f})"


def lines(result: dict) -> list[str]:
    """The summary for people (stderr)."""
    m, r = result["median"], result["ratios"]
    return [f"devid (DTLS 1.2, {result['workers']} worker(s)) / mosquitto (MQTT 5 over TLS 1.2), "
            f"median of {result['rounds']} paired rounds (min..max):",
            f"  handshakes per s          {m['mqtt']['per_s'] or 0:>9,.1f}/s mosquitto {m['dtls']['per_s'] or 0:>9,.1f}"
            f"/s devid   ratio {_ratio(r['rate'])}",
            f"  server CPU per handshake  {m['mqtt']['server_cpu_ms_per_op'] or 0:>8.3f} ms mosquitto "
            f"{m['dtls']['server_cpu_ms_per_op'] or 0:>8.3f} ms devid  ratio {_ratio(r['server_cpu'])}",
            f"  client CPU per handshake  {m['mqtt']['client_cpu_ms_per_op'] or 0:>8.3f} ms mqtt      "
            f"{m['dtls']['client_cpu_ms_per_op'] or 0:>8.3f} ms dtls   ratio {_ratio(r['client_cpu'])}"]


def main(ap, args) -> int:
    import platform
    check(ap, args)
    seconds = args.seconds or DEFAULT_SECONDS
    report = bench_cli.REPORT
    work, temporary = bench_cli.workdir(ap, args.workdir)
    served = broker = None
    try:
        started = time.perf_counter()
        load_start = os.getloadavg()
        broker = Broker()
        data, bundles = prepare(args, work, broker.port, report)
        served = start_gateway(data.path, args.workers, args.server_root)
        enrolled = run_clients(served.uri, bundles, served.pids, clients=1, concurrency=min(8, len(bundles)),
                               client="lean", flow=args.flow, label="untimed: ")
        if enrolled["errors"]:
            raise SystemExit(f"{enrolled['errors']} of {len(bundles)} enrollment(s) failed: "
                             f"{next(iter(enrolled.get('first_failures', {}).values()), '')}")
        report.stage(f"devid mqtt broker-config --out {broker.directory}; mosquitto on 127.0.0.1:{broker.port}")
        configured = broker.configure(data.path)
        broker.start()
        targets = {"mqtt": (broker.port, [broker.proc.pid]),
                   "dtls": (int(served.uri.rsplit(":", 1)[1]), served.pids)}
        rounds, errors = [], 0
        for r in range(args.rounds):
            got = {}
            for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                port, pids = targets[side]
                report.stage(f"round {r + 1}, {NAMES[side]}: {seconds:g} s, {args.concurrency} in flight from "
                             f"{args.clients} client process(es)")
                got[side] = measure(side, bundles, port, pids, seconds, args.clients, args.concurrency)
                errors += got[side]["failed"]
            rounds.append(got)
            report.stage(f"round {r + 1}: " + ", ".join(
                f"{NAMES[s]} {v['per_s'] or 0:,.1f}/s, server CPU {v['server_cpu_ms_per_op'] or 0:.3f} ms"
                for s, v in got.items()))
        result = {"devices": len(bundles), "workers": args.workers, "rounds": args.rounds,
                  "seconds_per_side_and_round": seconds, "clients": args.clients, "concurrency": args.concurrency,
                  "broker": {"version": mosquitto_version(), "port": broker.port, "directory": str(broker.directory),
                             "acl_devices": configured.get("acl_devices")},
                  "enrollment": {k: enrolled.get(k) for k in ("done", "errors", "seconds", "per_s")},
                  "per_round": rounds, "median": medians(rounds),
                  "ratios": {"rate": paired(rounds, "per_s"), "server_cpu": paired(rounds, "server_cpu_ms_per_op"),
                             "client_cpu": paired(rounds, "client_cpu_ms_per_op")},
                  "errors": errors, "load": {"start": load_start, "end": os.getloadavg()},
                  "seconds": round(time.perf_counter() - started, 1)}
        summary = {"machine": {"python": platform.python_version(), "nproc": os.cpu_count()},
                   "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "mqtt": result}
        for line in lines(result):
            report.stage(line)
        first = next((v["first_failure"] for r in rounds for v in r.values() if v.get("first_failure")), None)
        return bench_cli.emit(summary, f"{errors} connect(s) or handshake(s) failed: {first}" if errors else None)
    finally:
        if served is not None:
            served.stop()
        if broker is not None:
            broker.stop()
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
        else:
            report.stage(f"kept {work}")
