"""`devid bench` run end to end, small: the plain run's summary of what the flow costs (datagrams,
CoAP exchanges, write transactions per enrollment and renewal), `--durability` and `--flood`
(benchmarks/bench_hardening.py): every enrollment succeeds and the figures are there (their values
are the benchmark's business, not a test's). And the write probe's count against real SQLite
transactions (benchmarks/bench_wal.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devid.gateway.dtls import engine as E
from devid.gateway.store.database import Database

from .conftest import one_line_error, register_device, run_devid
from .dtls_helpers import FakeNetwork, client_context_for, server_engine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_counts  # noqa: E402
import bench_wal  # noqa: E402


def _bench(tmp_path, *args, devices: str = "6") -> dict:
    proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "bench", "--devices", devices, "--rounds", "1",
                           "--concurrency", "4", "--workers", "2", *args], capture_output=True, timeout=600, cwd=ROOT,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("DEVID_")},
                               "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:] + proc.stdout.decode()[-2000:]
    return json.loads(proc.stdout)


def test_durability_bench(tmp_path):
    d = _bench(tmp_path, "--durability")["durability"]
    assert d["errors"] == 0 and len(d["rounds"]) == 1
    for mode in ("normal", "durable", "full"):
        run = d["rounds"][0][mode]
        assert run["done"] == 6 and run["server_cpu_ms_per_op"] > 0
    assert d["ratios_to_normal"]["durable"]["server_cpu"] > 0
    assert d["commit"]["full"]["wall_us"] > 0 and d["commit"]["normal"]["wall_us"] > 0


def test_flood_bench(tmp_path):
    f = _bench(tmp_path, "--flood", "--flood-sessions", "2", "--flood-window", "4")["flood"]
    assert f["errors"] == 0
    [r] = f["rounds"]
    assert r["quiet"]["done"] == 6 and r["flooded"]["done"] == 6
    flood = r["flooded"]["flood"]
    assert flood["counts"]["sent"] > 0 and flood["answers_per_s"] > 0
    assert f["p95_ratio_median"] is not None and f["target_p95_ratio"] == 1.5


def test_the_summary_counts_datagrams_exchanges_and_write_transactions(tmp_path):
    doc = _bench(tmp_path, "--renew", "--probe-devices", "2", "--baseline-seconds", "0.5", "--json", devices="4")
    probe = doc["write_probe"]
    assert probe["devices"] == 2 and probe["concurrency"] == 1
    for mode in ("enroll", "renew"):
        run = doc[mode]
        assert run["done"] == 4 and run["errors"] == 0
        assert probe[mode]["done"] == 2 and probe[mode]["errors"] == 0 and probe[mode]["commits"] >= 2
        d = run["datagrams_per_op"]
        hs, after = d["handshake"], d["after_handshake"]
        assert d["total"] == pytest.approx(hs["sent"] + hs["received"] + after["sent"] + after["received"])
        assert hs["sent"] >= 2 and hs["received"] >= 2            # ClientHello, again with the cookie; their answers
        # every exchange is at least a request sent and an answer received after the handshake
        assert run["coap_exchanges_per_op"] >= 1
        assert after["sent"] >= run["coap_exchanges_per_op"] and after["received"] >= run["coap_exchanges_per_op"]
        # at least the certificate's transaction; every transaction writes at least one page
        assert run["write_transactions_per_op"] == pytest.approx(probe[mode]["commits"] / 2)
        assert run["write_transactions_per_op"] >= 1
        assert run["wal_frames_per_op"] >= run["write_transactions_per_op"]
    assert doc["renew"]["coap_exchanges_per_op"] == 1           # EST /sren
    assert set(doc["counting"]) == {"datagrams_per_op", "coap_exchanges_per_op", "write_transactions_per_op"}
    # the server's CPU clock counts 10 ms ticks: 4 renewals may not move it (then null, not 0)
    assert doc["crypto_floor"]["ms_per_enrollment"] > 0
    assert {"server_cpu_vs_crypto_floor", "renew_server_cpu_vs_crypto_floor"} <= set(doc["ratios"])
    for mode, key in (("enroll", "server_cpu_vs_crypto_floor"), ("renew", "renew_server_cpu_vs_crypto_floor")):
        assert (doc["ratios"][key] is None) == (not doc[mode]["server_cpu_ms_per_op"])


def test_probe_devices_is_checked():
    one_line_error(run_devid("bench", "--probe-devices", "51"), "--probe-devices")
    one_line_error(run_devid("bench", "--probe-devices", "-1"), "--probe-devices")


class _Scratch(Database):
    def _open_schema(self, create: bool, readonly: bool) -> None:
        self._db.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")


def test_the_write_probe_counts_committed_write_transactions(tmp_path):
    db = _Scratch(tmp_path / "scratch.sqlite3", create=True)
    try:
        probe = bench_wal.WriteProbe(db.path)
        probe.start()
        for i in range(5):
            with db.transaction(durable=i % 2 == 0) as c:
                c.execute("INSERT INTO t VALUES (?)", (i,))
                c.execute("INSERT INTO t VALUES (?)", (i,))
        with db.transaction():                        # nothing written: no commit in the WAL
            pass
        with db.transaction() as c:
            c.execute("DELETE FROM t WHERE x = 99")
        assert probe.stop() == {"commits": 5, "frames": 5}

        probe.start()                                 # each probe starts from an empty WAL
        with db.transaction() as c:
            c.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(5000)])
        with db.transaction() as c:
            c.execute("INSERT INTO t VALUES (1)")
        counted = probe.stop()
        assert counted["commits"] == 2 and counted["frames"] > 2

        # a checkpoint that restarts the WAL in the middle of a probe loses count: it says so
        probe.start()
        for _ in range(3):
            with db.transaction() as c:
                c.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(2000)])
        with db.reading() as c:
            c.execute("PRAGMA wal_checkpoint(RESTART)")
        with db.transaction() as c:
            c.execute("INSERT INTO t VALUES (1)")
        counted = probe.stop()
        assert counted["commits"] is None and "checkpointed" in counted["problem"]
    finally:
        db.close()


def test_the_wal_reader_refuses_what_is_not_a_wal(tmp_path):
    bad = tmp_path / "x-wal"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a SQLite WAL"):
        bench_wal.read_wal(bad)
    assert bench_wal.read_wal(tmp_path / "missing-wal") == {"frames": 0, "commits": 0, "beyond": 0}


def test_bench_ab_pairs_alternating_rounds(tmp_path):
    """bench_ab.py, one round, the same checkout on both sides, the candidate's clients on uvloop
    (`devid bench --client-loop uvloop`): each side's figures per mode and the paired ratios."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ab.py"), "--rounds", "1",
                           "--candidate-args", "--client-loop uvloop", "--json", "--devices", "3", "--concurrency", "2",
                           "--clients", "1", "--workers", "1", "--probe-devices", "0", "--renew"],
                          capture_output=True, timeout=600, cwd=ROOT,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("DEVID_")},
                               "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["settings"]["candidate"]["bench"][-2:] == ["--client-loop", "uvloop"]
    assert "--client-loop" not in doc["settings"]["baseline"]["bench"]
    [r] = doc["rounds"]
    for mode in ("enroll", "renew"):
        for side in ("baseline", "candidate"):
            assert r[side][mode]["per_s"] > 0 and doc[mode][side]["per_s"] == r[side][mode]["per_s"]
        ratios = doc[mode]["ratios_candidate_to_baseline"]
        assert ratios["per_s"]["median"] == round(r["candidate"][mode]["per_s"] / r["baseline"][mode]["per_s"], 3)
        # the noise control: null only where the server's 10 ms CPU ticks did not move in a run this small
        assert set(ratios) == {"per_s", "server_cpu_ms_per_op", "client_cpu_ms_per_op", "p95_ms",
                               "server_per_client_cpu"}
    assert "round 1 baseline" in proc.stderr.decode() and "round 1 candidate" in proc.stderr.decode()


def test_the_sessions_count_every_datagram_and_each_exchange_once(data, registry, ca):
    """bench_counts' layer over a ClientEngine, against the real server engine in memory: the
    handshake's datagrams each way as the network carried them, then CoAP requests (a
    retransmission and an ACK are datagrams, not exchanges), an answer, close_notify."""
    key, issued = register_device(ca, "SN1", "temperature-sensor")
    srv = server_engine(data, registry)
    ctx = client_context_for(issued.cert, [data.cert("manufacturing")], key, data.cert("root"))
    client = bench_counts.counting(E.ClientEngine)(ctx, ("gw", 5684), takeover=True)
    assert bench_counts.counting(type(client)) is type(client)
    before = bench_counts.snapshot()
    net = FakeNetwork(srv)
    assert net.run(client, lambda: client.established and any(
        isinstance(e, E.HandshakeComplete) for e in net.server_events), real_timeout=5), client.closed_reason
    got = bench_counts.delta(before)
    c2s, s2c = (sum(d == way for d, _ in net.wire) for way in ("c2s", "s2c"))
    assert c2s >= 3 and s2c >= 3                   # ClientHello twice and the client's flight; HVR, flights
    assert got == {"handshake_sent": c2s, "handshake_received": s2c, "sent": 0, "received": 0, "exchanges": 0}

    get = bytes([0x40, 0x01, 0x12, 0x34])          # CON GET, Message ID 0x1234
    post = bytes([0x40, 0x02, 0x12, 0x35])         # CON POST, the next Message ID
    ack = bytes([0x60, 0x00, 0x99, 0x99])          # an empty ACK (of a separate response)
    for message in (get, get, post, ack):          # the GET retransmitted
        (sent,) = client.send(message, 0.0).datagrams
        assert E.ApplicationData(net.peer, message) in srv.receive(net.peer, sent[1], 0.0).events
    (answer,) = srv.send(net.peer, bytes([0x60, 0x45, 0x12, 0x35]), 0.0).datagrams
    client.receive(answer[1], 0.0)
    assert len(client.close(0.0).datagrams) == 1   # close_notify
    got = bench_counts.delta(before)
    assert (got["sent"], got["received"], got["exchanges"]) == (5, 1, 2)
    assert (got["handshake_sent"], got["handshake_received"]) == (c2s, s2c)
    per = bench_counts.per_op([got], 1)
    assert per["datagrams_per_op"]["total"] == c2s + s2c + 6 and per["coap_exchanges_per_op"] == 2
    assert bench_counts.per_op([], 3) is None and bench_counts.per_op([dict.fromkeys(bench_counts.KEYS, 0)], 3) is None


def test_the_flows_cost_side_by_side(tmp_path):
    """`--flow`: the one-request enrollment (the default) against the classic one, as counted by
    the same bench: fewer exchanges, fewer datagrams after the handshake, fewer write transactions."""
    (tmp_path / "one").mkdir()
    (tmp_path / "classic").mkdir()
    one = _bench(tmp_path / "one", "--probe-devices", "2", "--no-baselines", "--json", devices="4")
    classic = _bench(tmp_path / "classic", "--flow", "classic", "--probe-devices", "2", "--no-baselines", "--json",
                     devices="4")
    assert (one["enroll"]["flow"], classic["enroll"]["flow"]) == ("one-request", "classic")
    assert one["settings"]["flow"] == "one-request" and classic["settings"]["flow"] == "classic"
    a, b = one["enroll"], classic["enroll"]
    assert a["errors"] == 0 and b["errors"] == 0
    assert a["coap_exchanges_per_op"] < b["coap_exchanges_per_op"]
    assert a["datagrams_per_op"]["after_handshake"]["sent"] < b["datagrams_per_op"]["after_handshake"]["sent"]
    assert a["write_transactions_per_op"] == 1 < b["write_transactions_per_op"]
    assert "nonce" not in a["step_latency_ms"] and "nonce" in b["step_latency_ms"]
