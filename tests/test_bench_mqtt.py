"""`devid bench --mqtt` (benchmarks/bench_mqtt.py), small and end to end: devices enrolled through a
real gateway, a real Mosquitto configured by `devid mqtt broker-config`, one short round of TLS
connects against it and of DTLS handshakes against the gateway; every connect and handshake
succeeds, the JSON document has its shape, its figures are positive and its ratios are the ratios
of that round's figures (their values are the benchmark's business, not a test's); the broker and
its directory are gone afterwards; and the command line refuses what it cannot combine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import one_line_error, run_devid

ROOT = Path(__file__).resolve().parent.parent


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_one_round_of_mqtt_connects_against_dtls_handshakes(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DEVID_")}, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "bench", "--mqtt", "--rounds", "1",
                           "--seconds", "0.5", "--devices", "3", "--concurrency", "4", "--clients", "2",
                           "--workers", "1"], capture_output=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:] + proc.stdout.decode()[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] is True and summary["settings"]["mqtt"] is True
    s = summary["mqtt"]
    assert s["rounds"] == 1 and s["errors"] == 0 and s["devices"] == 3 and s["workers"] == 1
    assert s["seconds_per_side_and_round"] == 0.5 and s["clients"] == 2 and s["concurrency"] == 4
    # the devices were enrolled through the gateway, and the broker's ACL names each of them
    assert s["enrollment"]["done"] == 3 and s["enrollment"]["errors"] == 0
    assert s["broker"]["acl_devices"] == 3 and "mosquitto version" in s["broker"]["version"]

    [r] = s["per_round"]
    assert set(r) == {"mqtt", "dtls"}
    for side in ("mqtt", "dtls"):
        assert r[side]["failed"] == 0 and r[side]["done"] > 0 and "first_failure" not in r[side]
        for key in ("seconds", "per_s", "server_cpu_ms_per_op", "client_cpu_ms_per_op"):
            assert _positive(r[side][key]), (side, key, r[side])
        for key in ("per_s", "server_cpu_ms_per_op", "client_cpu_ms_per_op"):
            assert s["median"][side][key] == r[side][key]
    assert r["mqtt"]["tls"]["version"] == "TLSv1.2"
    for name, key in (("rate", "per_s"), ("server_cpu", "server_cpu_ms_per_op"),
                      ("client_cpu", "client_cpu_ms_per_op")):
        ratio = s["ratios"][name]
        assert ratio["median"] == ratio["min"] == ratio["max"] == round(r["dtls"][key] / r["mqtt"][key], 3)

    err = proc.stderr.decode()
    assert "round 1, mosquitto" in err and "round 1, devid" in err and "devid (DTLS 1.2" in err
    # the broker's directory (where the mosquitto user can reach it: not in pytest's 0700 tmp_path)
    # and the run's scratch directory are removed at the end
    assert not Path(s["broker"]["directory"]).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("devid-bench")]


def test_mqtt_refuses_what_it_cannot_combine():
    one_line_error(run_devid("bench", "--mqtt", "--pkcs11"), "separate runs: choose one")
    one_line_error(run_devid("bench", "--mqtt", "--renew"), "leave out --renew")
    one_line_error(run_devid("bench", "--seconds", "3"), "--seconds is a size of --mqtt")
    one_line_error(run_devid("bench", "--mqtt", "--seconds", "0"), "--seconds must be more than 0")
