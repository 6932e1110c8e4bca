"""The two measurements of issue 10, run by `devid bench --durability` and `devid bench --flood`
(benchmarks/bench_enroll.py provisions the devices; bench_clients.py drives the enrollments).

--durability   the cost of durable commits. Rounds of enrollments against a fresh gateway in each
               of three registry modes, in alternating order (A B C, C B A, ...):
                 normal   no commit waits for the disk (DEVID_BENCH_SYNCHRONOUS=normal: the
                          baseline, not safe against a power cut)
                 durable  devid's default: synchronous=FULL for the transactions that issue,
                          register or revoke (one WAL fsync per enrollment), NORMAL for nonces,
                          the attestation log and verdict uses
                 full     synchronous=FULL for every transaction (the alternative: four WAL
                          fsyncs per enrollment)
               Reported per mode: server CPU per enrollment, rate, latency; and the ratios to
               `normal` as medians of the per-round pairs. Plus, on the data directory's file
               system, the time of one commit of an issuance-sized transaction made durable
               three ways (not at all; by a FULL commit; by a checkpoint after it), interleaved.

--flood        enrollment latency of well-behaved devices while another identity floods nonce
               requests. Each round enrolls `--devices` devices without a flood ("quiet") and
               `--devices` others while a separate process floods `GET /attest/nonce` with one
               factory identity (`--flood-sessions` DTLS sessions, `--flood-window` requests in
               flight on each, a new request as soon as any answer comes back, whatever it is:
               2.05, 4.29 Too Many Requests, 5.03, ...), quiet and flooded in alternating order.
               Reported: p95 flooded / p95 quiet per round (median) and pooled, against the
               target of 1.5; the flood's request rate and its answers by code; the nonces left
               in the registry.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sqlite3
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench_clients import run_clients
from bench_common import start_gateway
from devid.gateway.device.stats import median, percentile_ms

SYNC_MODES = {"normal": {"DEVID_BENCH_SYNCHRONOUS": "normal"}, "durable": {},
              "full": {"DEVID_BENCH_SYNCHRONOUS": "full"}}


def _pooled(latencies: list[float], p: float) -> float | None:
    return percentile_ms(latencies, p)


def _brief(run: dict) -> dict:
    return {k: run[k] for k in ("done", "errors", "per_s", "latency_ms", "server_cpu_ms_per_op",
                                "client_cpu_ms_per_op") if k in run} | (
        {"first_failures": run["first_failures"]} if run.get("first_failures") else {})


# -- durability ------------------------------------------------------------------------------------

def commit_cost(directory: Path, n: int = 300) -> dict:
    """One commit of an issuance-sized transaction (a ~700-byte certificate row, an UPDATE of a
    device row), made durable three ways, interleaved in slices of 25, on `directory`'s file
    system: not at all (NORMAL), by the commit itself (FULL: the WAL is fsynced), or by a
    checkpoint after a NORMAL commit (the WAL copied into the database file, both fsynced)."""
    ways = {"normal": ("NORMAL", False), "full": ("FULL", False), "checkpoint": ("NORMAL", True)}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        db = sqlite3.connect(str(Path(tmp) / "commit.sqlite3"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE c (serial TEXT PRIMARY KEY, der BLOB)")
        db.execute("CREATE TABLE d (serial TEXT PRIMARY KEY, state TEXT)")
        db.executemany("INSERT INTO d VALUES (?, 'manufactured')", [(str(i),) for i in range(n * len(ways))])
        wall = dict.fromkeys(ways, 0.0)
        cpu = dict.fromkeys(ways, 0.0)
        done = dict.fromkeys(ways, 0)
        i = 0
        order = list(ways)
        while min(done.values()) < n:
            for way in order:
                level, checkpoint = ways[way]
                db.execute(f"PRAGMA synchronous={level}")
                for _ in range(25):
                    t, c = time.perf_counter(), time.process_time()
                    db.execute("BEGIN IMMEDIATE")
                    db.execute("INSERT INTO c VALUES (?, ?)", (os.urandom(16).hex(), os.urandom(700)))
                    db.execute("UPDATE d SET state = 'enrolled' WHERE serial = ?", (str(i),))
                    db.execute("COMMIT")
                    if checkpoint:
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    wall[way] += time.perf_counter() - t
                    cpu[way] += time.process_time() - c
                    done[way] += 1
                    i += 1
            order.reverse()
        db.close()
    out = {way: {"wall_us": round(wall[way] / done[way] * 1e6, 1), "cpu_us": round(cpu[way] / done[way] * 1e6, 1)}
           for way in ways}
    for way in ("full", "checkpoint"):
        out[f"{way}_vs_normal_wall"] = round(out[way]["wall_us"] / out["normal"]["wall_us"], 2)
    return out


def durability(args, data, bundles: list[str], work: Path) -> dict:
    rounds: list[dict[str, dict]] = []
    pools: dict[str, list[float]] = {m: [] for m in SYNC_MODES}
    errors = 0
    chunks = iter(bundles[i:i + args.devices] for i in range(0, len(bundles), args.devices))
    for r in range(args.rounds):
        got: dict[str, dict] = {}
        for mode in (list(SYNC_MODES) if r % 2 == 0 else list(reversed(SYNC_MODES))):
            served = start_gateway(data.path, args.workers, args.server_root, SYNC_MODES[mode])
            try:
                run = run_clients(served.uri, next(chunks), served.pids, clients=args.clients,
                                    concurrency=args.concurrency, client=args.client)
            finally:
                served.stop()
            pools[mode] += run.pop("_latencies")
            errors += run["errors"]
            got[mode] = _brief(run)
        rounds.append(got)

    def ratio(mode: str, key) -> float | None:
        pairs = [key(g[mode]) / key(g["normal"]) for g in rounds if key(g[mode]) and key(g["normal"])]
        return round(statistics.median(pairs), 3) if pairs else None
    cpu = lambda run: run.get("server_cpu_ms_per_op")  # noqa: E731
    p95 = lambda run: run["latency_ms"]["p95"]         # noqa: E731
    return {
        "errors": errors,
        "rounds": rounds,
        "median": {m: {"server_cpu_ms_per_op": median(g[m]["server_cpu_ms_per_op"] for g in rounds),   # null if
                       "per_s": median(g[m]["per_s"] for g in rounds),                                # none done
                       "p95_ms_pooled": _pooled(pools[m], 95)} for m in SYNC_MODES},
        "ratios_to_normal": {m: {"server_cpu": ratio(m, cpu), "p95": ratio(m, p95)} for m in ("durable", "full")},
        "commit": commit_cost(data.path),
        "filesystem": _fstype(data.path),
    }


def _fstype(path: Path) -> str:
    best, fs = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            mnt, kind = line.split()[1], line.split()[2]
            if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, kind
    except OSError:
        pass
    return fs


# -- flood -----------------------------------------------------------------------------------------

def _flooder(gateway: str, bundle: str, sessions: int, window: int, q, stop) -> None:
    """A separate process: flood GET /attest/nonce with one factory identity until `stop`."""
    from devid.gateway.device.protocol import NONCE
    from loadgen import Target
    from loadgen_coap import ACK, CON, RST, decode_message, encode_message, encode_options
    from loadgen_dtls import Session
    from loadgen_trust import Trust, load_device
    dev = load_device(Path(bundle))
    target = Target.parse(gateway)
    trust = Trust(dev.root, target.host, full_chain=True)
    counts: Counter = Counter()
    request_opts = encode_options(NONCE.options)

    class FloodSession(Session):
        __slots__ = ("outstanding",)

        def _coap(self, data: bytes) -> None:
            try:
                m = decode_message(data)
            except ValueError:
                return
            if m.mtype == CON:
                self._send(encode_message(ACK, 0, m.mid, b"", b""))
            if m.mtype == RST:
                counts["RST"] += 1
                self.outstanding.pop(m.mid, None)
            elif m.code != 0 and self.outstanding.pop(m.mid if m.mtype == ACK else -1, None) is not None:
                counts[m.code_text] += 1
            elif m.code != 0 and m.token:
                counts[m.code_text] += 1         # a separate response
            self.top_up()

        def top_up(self) -> None:
            now = time.monotonic()
            for mid, sent in list(self.outstanding.items()):
                if now - sent > 2.0:            # no answer: counted as lost, the slot reused
                    del self.outstanding[mid]
                    counts["no answer"] += 1
            while len(self.outstanding) < window and not self.closed and not stop.is_set():
                self.mid = (self.mid + 1) & 0xFFFF
                self.tok = (self.tok + 1) & 0xFFFF
                self.outstanding[self.mid] = now
                counts["sent"] += 1
                self._send(encode_message(CON, NONCE.method, self.mid, self.tok.to_bytes(2, "big"), request_opts))

    async def one_session() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            sess = FloodSession(loop, target.peer, target.family, trust.context(dev), dev, trust, 10.0)
            sess.outstanding = {}
            try:
                await sess.connect(10.0)
            except ConnectionError:
                counts["handshake refused"] += 1
                sess.close()
                await asyncio.sleep(0.5)
                continue
            counts["sessions"] += 1
            while not sess.closed and not stop.is_set():
                sess.top_up()
                await asyncio.sleep(0.05)
            if sess.closed and not stop.is_set():
                counts["sessions ended by the gateway"] += 1
            sess.close()

    async def main() -> None:
        q.put(("ready", None))
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one_session()) for _ in range(sessions)]
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks, return_exceptions=True)
        q.put(("done", {"seconds": time.perf_counter() - t0, "counts": dict(counts),
                        "cpu": time.process_time()}))
    asyncio.run(main())


def flood(args, data, bundles: list[str]) -> dict:
    flooder_bundle, bundles = bundles[-1], bundles[:-1]
    chunks = iter(bundles[i:i + args.devices] for i in range(0, len(bundles), args.devices))
    ctx = multiprocessing.get_context("spawn")
    served = start_gateway(data.path, args.workers, args.server_root)
    rounds: list[dict] = []
    pools: dict[str, list[float]] = {"quiet": [], "flooded": []}
    errors = 0
    try:
        for r in range(args.rounds):
            got: dict[str, dict] = {}
            for mode in (("quiet", "flooded") if r % 2 == 0 else ("flooded", "quiet")):
                flooder = None
                if mode == "flooded":
                    q, stop = ctx.Queue(), ctx.Event()
                    flooder = ctx.Process(target=_flooder, args=(served.uri, flooder_bundle, args.flood_sessions,
                                                                 args.flood_window, q, stop))
                    flooder.start()
                    assert q.get(timeout=120)[0] == "ready"
                    time.sleep(1.0)             # the flood under way before the timed part
                try:
                    run = run_clients(served.uri, next(chunks), served.pids, clients=args.clients,
                                        concurrency=args.concurrency, client=args.client)
                finally:
                    if flooder is not None:
                        stop.set()
                        report = q.get(timeout=120)[1]
                        flooder.join(60)
                pools[mode] += run.pop("_latencies")
                errors += run["errors"]
                got[mode] = _brief(run)
                if flooder is not None:
                    counts = report["counts"]
                    answered = sum(v for k, v in counts.items() if k[:1].isdigit())
                    got[mode]["flood"] = {"requests_per_s": round(counts.get("sent", 0) / report["seconds"], 1),
                                          "answers_per_s": round(answered / report["seconds"], 1),
                                          "counts": counts, "flooder_cpu_s": round(report["cpu"], 2)}
            got["p95_ratio"] = round(got["flooded"]["latency_ms"]["p95"] / got["quiet"]["latency_ms"]["p95"], 3) \
                if got["quiet"]["latency_ms"]["p95"] and got["flooded"]["latency_ms"]["p95"] else None
            rounds.append(got)
    finally:
        served.stop()
    reg = data.open_registry()
    try:
        with reg.reading() as db:
            nonces = db.execute("SELECT COUNT(*) FROM attestation_nonces").fetchone()[0]
    finally:
        reg.close()
    ratios = [g["p95_ratio"] for g in rounds if g["p95_ratio"]]
    pooled = {m: _pooled(pools[m], 95) for m in pools}
    return {
        "errors": errors,
        "rounds": rounds,
        "p95_ratio_median": round(statistics.median(ratios), 3) if ratios else None,
        "p95_ms_pooled": pooled,
        "p95_ratio_pooled": round(pooled["flooded"] / pooled["quiet"], 3) if pooled["quiet"] and pooled["flooded"]
        else None,
        "target_p95_ratio": 1.5,
        "nonces_in_registry_after": nonces,
    }
