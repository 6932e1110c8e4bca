#!/usr/bin/env python3
"""The gateway's CPU with metrics and the operator HTTP listener on against off (issue 17:
target within 5 %), in one run.

    .venv/bin/python benchmarks/bench_metrics.py [--rounds 3] [--json] [bench options...]

Each round runs `devid bench` (bench_enroll.py) twice against this checkout's gateway, once with
`DEVID_METRICS=off` in its environment and no `--http` (the baseline: every metric a no-op,
gateway/system/metrics.py, and no operator listener) and once with the metrics on (the default)
and `--http 127.0.0.1:PORT --metrics-open`, scraped by this process every `--scrape-every`
seconds (default 1 s, harsher than Prometheus' usual 15 s) while the run lasts, in alternating order
(off on, on off, ...), and prints per mode (enroll, and renew with --renew) the server CPU per
operation, the client CPU, the rate and p95, and the on/off ratios as medians of the per-round
pairs with their range (bench_ab.py's summary: read `server_per_client_cpu`, which cancels most
of a shared machine's noise). Options other than --rounds and --json go to every bench run
(e.g. --devices 400 --workers 2 --renew).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_ab  # noqa: E402

ENV = "DEVID_METRICS"
SIDES = {"baseline": "off", "candidate": "on"}      # bench_ab's names: baseline = metrics off


FLAGS = "DEVID_BENCH_SERVE_FLAGS"                   # bench_common.start_gateway adds these serve flags


def _free_tcp_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scraper:
    """GET /metrics every `every` seconds in a thread, as a Prometheus server would; counts the
    scrapes that answered 200 (before the listener is up, a try just fails)."""

    def __init__(self, port: int, every: float) -> None:
        import threading
        self.url, self.every = f"http://127.0.0.1:{port}/metrics", every
        self.ok = self.failed = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import urllib.request
        while not self._stop.wait(self.every):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as answer:
                    self.bytes = len(answer.read())
                    self.ok += 1
            except OSError:
                self.failed += 1

    def __enter__(self) -> "Scraper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one(setting: str, args: list[str], scrape_every: float) -> tuple[dict, dict | None]:
    saved = {k: os.environ.get(k) for k in (ENV, FLAGS)}
    os.environ[ENV] = setting                   # the gateway started by the bench inherits it
    try:
        if setting == "off":
            os.environ.pop(FLAGS, None)
            return bench_ab.one(ROOT, args), None
        port = _free_tcp_port()
        os.environ[FLAGS] = f"--http 127.0.0.1:{port} --metrics-open"
        with Scraper(port, scrape_every) as scraper:
            figures = bench_ab.one(ROOT, args)
        return figures, {"scrapes": scraper.ok, "failed": scraper.failed, "bytes": scraper.bytes}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--scrape-every", type=float, default=1.0, metavar="S",
                    help="seconds between scrapes of /metrics on the 'on' side (default 1)")
    args, passthrough = ap.parse_known_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    rounds = []
    scrapes = []
    order = list(SIDES)
    for r in range(args.rounds):
        got = {}
        for side in (order if r % 2 == 0 else order[::-1]):
            got[side], scraped = one(SIDES[side], passthrough, args.scrape_every)
            if scraped is not None:
                scrapes.append(scraped)
                print(f"round {r + 1} /metrics scraped {scraped['scrapes']} times ({scraped['bytes']} bytes), "
                      f"{scraped['failed']} tries before the listener was up", file=sys.stderr, flush=True)
            for mode, f in got[side].items():
                print(f"round {r + 1} metrics {SIDES[side]:3s} {mode:6s} {f['per_s']:7.1f}/s  server "
                      f"{f['server_cpu_ms_per_op'] or 0:.3f} ms  client {f['client_cpu_ms_per_op']:.3f} ms  "
                      f"p95 {f['p95_ms']} ms", file=sys.stderr, flush=True)
        rounds.append(got)
    summary = bench_ab.summarize(rounds)
    summary["rounds"] = rounds
    summary["scrapes"] = scrapes
    summary["settings"] = {"baseline": f"{ENV}=off, no --http", "candidate": f"{ENV}=on, --http --metrics-open, "
                           f"scraped every {args.scrape_every:g} s", "bench": passthrough, "rounds": args.rounds}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    bench_ab.print_summary(summary, args.rounds, {"baseline": "off", "candidate": "on + http"}, "on/off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
