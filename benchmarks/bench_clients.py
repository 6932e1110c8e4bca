"""The client side of `devid bench`: enrollments (or renewals) from client processes separate from
the server, started together once every one has loaded what it needs, and one JSON summary of a
run. `--client lean` is benchmarks/loadgen.py; `--client script` the field engineer's script per
device (devid.gateway.device.simulator). Both run the device client's flows. The lean client's
sessions count datagrams and CoAP exchanges (bench_counts.py); a `probe` (bench_wal.WriteProbe)
counts the registry's write transactions over the timed part."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from pathlib import Path

import bench_cli
import bench_counts
from bench_common import bench_firmware, cpu_seconds, peak_rss_kib
from devid.gateway.device.stats import latency_ms, step_latency_ms


def run_loop(coro, loop: str):
    """Run `coro` on a new event loop: asyncio's own, or uvloop's (`--client-loop`)."""
    if loop == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def _client(gateway: str, bundles: list[str], concurrency: int, renew: bool, loop: str, flow: str, q, go) -> None:
    """--client script: the field engineer's script per device (gateway/device/simulator.py)."""
    from devid.gateway.device.simulator import simulate
    fw = bench_firmware()
    q.put(("ready", None))
    go.wait()
    cpu0 = time.process_time()
    report = run_loop(simulate(gateway, [Path(b) for b in bundles], lambda b: fw, concurrency=concurrency,
                               renew_only=renew, flow=None if renew else flow), loop)
    q.put(("done", {"latencies": report.latencies, "failures": report.failures,
                    "steps": [r.steps for r in report.results], "cpu": time.process_time() - cpu0}))


def _client_lean(gateway: str, bundles: list[str], concurrency: int, renew: bool, loop: str, flow: str, q,
                 go) -> None:
    """--client lean: benchmarks/loadgen.py. Bundles are loaded, the CA certificates fetched and
    the client Context built before the timed part; the operational identities are saved after it."""
    import loadgen
    import loadgen_dtls
    bench_counts.install(loadgen_dtls)          # datagrams and CoAP exchanges per session
    fw = bench_firmware()
    target = loadgen.Target.parse(gateway)
    devices, failures = loadgen.load_devices([Path(b) for b in bundles], operational=renew)

    counted = {}

    def started() -> None:
        q.put(("ready", None))
        go.wait()
        counted.update(bench_counts.snapshot())
    if not devices:
        started()
        q.put(("done", {"latencies": [], "failures": failures, "steps": [], "cpu": 0.0}))
        return
    trust = loadgen.Trust(devices[0].root, target.host)
    try:
        report = run_loop(loadgen.run(target, devices, trust, renew=renew, firmware=fw, concurrency=concurrency,
                                      started=started, flow=flow), loop)
    except loadgen.Failed as exc:             # the set-up (CA certificates) failed: every device fails
        q.put(("done", {"latencies": [], "failures": {d.serial: str(exc) for d in devices}, "steps": [],
                        "cpu": 0.0}))
        return
    report.failures.update(failures)
    q.put(("done", {"latencies": [o.seconds for o in report.outcomes], "failures": report.failures,
                    "steps": [o.steps for o in report.outcomes], "cpu": report.cpu_seconds,
                    "counters": report.counters, "wire": bench_counts.delta(counted)}))
    loadgen.save_operational(devices, report)       # after the timed part (for --renew)


def run_clients(gateway: str, bundles: list[str], pids: list[int], *, clients: int, concurrency: int,
                client: str = "lean", renew: bool = False, probe=None, label: str = "",
                loop: str = "asyncio", flow: str = "one-request") -> dict:
    """Enroll (or renew) `bundles` from `clients` processes, on event loops of kind `loop`
    (asyncio, uvloop), enrolling by `flow` (one-request, classic; renewals are the same in
    both); the JSON summary of one mode. With a
    `probe` (bench_wal.WriteProbe): its `start` right before the timed part, its `stop` right
    after, as `write_probe` in the summary. `label` names the run in the progress lines."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    go = ctx.Event()
    shares = [bundles[i::clients] for i in range(clients)]
    per = max(1, concurrency // clients)
    target = _client_lean if client == "lean" else _client
    procs = [ctx.Process(target=target, args=(gateway, s, per, renew, loop, flow, q, go)) for s in shares if s]
    report = bench_cli.REPORT
    mode = label + ("renew" if renew else "enroll")
    report.stage(f"{mode}: {len(bundles)} devices, {concurrency} in flight from {len(procs)} {client} "
                 f"client process(es) against {gateway}")
    for p in procs:
        p.start()
    # the timed part starts when every client has loaded what it needs (process start-up,
    # imports and, for the lean client, bundles and CA certificates are not timed)
    for _ in procs:
        kind, _payload = q.get(timeout=600)
        if kind != "ready":
            raise SystemExit(f"a client process failed to start: {kind}")
    progress = report.progress(f"{mode}ing") if report.issued is not None else None
    issued0 = report.issued() if progress else 0
    if probe is not None:
        probe.start()
    cpu0 = cpu_seconds(pids)
    t0 = time.perf_counter()
    go.set()
    results = []
    deadline = time.monotonic() + 3600
    while len(results) < len(procs):
        try:
            results.append(q.get(timeout=1.0 if progress else max(0.0, deadline - time.monotonic()))[1])
        except queue.Empty:
            if time.monotonic() >= deadline:
                raise SystemExit("the client processes did not finish within an hour") from None
            if progress:
                progress(min(len(bundles), report.issued() - issued0), len(bundles))
    wall = time.perf_counter() - t0
    cpu1 = cpu_seconds(pids)
    written = probe.stop() if probe is not None else None
    for p in procs:
        p.join(300)        # the lean client saves the operational identities before it exits
    lat = [x for r in results for x in r["latencies"]]
    failures = {k: v for r in results for k, v in r["failures"].items()}
    steps = [s for r in results for s in r["steps"]]
    client_cpu = sum(r["cpu"] for r in results)
    done = len(lat)
    report.finished(progress, mode, done, len(bundles), len(failures), wall)
    out = {"mode": "renew" if renew else "enroll", "client": client, "flow": None if renew else flow,
           "devices": len(bundles),
           "done": done, "errors": len(failures), "seconds": round(wall, 2),
           "per_s": round(done / wall, 1) if wall else None,
           "latency_ms": latency_ms(lat),
           "server_cpu_ms_per_op": round((cpu1 - cpu0) * 1000 / done, 3) if done and pids else None,
           "client_cpu_ms_per_op": round(client_cpu * 1000 / done, 3) if done else None,
           "server_peak_rss_kib": peak_rss_kib(pids) if pids else None}
    counters = [r["counters"] for r in results if "counters" in r]
    if counters:      # lean client: retransmissions seen (lost datagrams or a slow gateway)
        out["client_retransmissions"] = {k: sum(c[k] for c in counters) for k in counters[0]}
    wire = bench_counts.per_op([r["wire"] for r in results if "wire" in r], done)
    if wire:
        out.update(wire)
    if written is not None:
        out["write_probe"] = written
    if steps:
        # the steps the flow took, in their order (connect, then the flow's own: nonce, evidence,
        # enroll, config in the classic enrollment; renew)
        out["step_latency_ms"] = step_latency_ms(steps, dict.fromkeys(n for s in steps for n in s))
    if failures:
        out["first_failures"] = dict(list(failures.items())[:5])
    out["_latencies"] = lat          # for pooled figures across rounds; removed before printing
    return out
