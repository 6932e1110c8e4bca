"""`devid bench --pkcs11` (benchmarks/bench_pkcs11.py), small and end to end: one round of each
measurement with keys in a SoftHSM2 token against keys in files, every enrollment succeeds on both
sides, the JSON document has its shape, its figures are positive and its ratios are the ratios
of that round's figures (their values are the benchmark's business, not a test's); the
provisioning part runs where `devid provision` has `--secure-element` and says it is skipped where
it has not; the PIN the run made is in none of its output; and its command line refuses what it
cannot compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import one_line_error, run_devid

ROOT = Path(__file__).resolve().parent.parent
PIN = "bench-pin-5b1f93"          # the tokens' user PIN for the run: it must appear nowhere


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_one_round_of_token_against_files(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DEVID_", "SOFTHSM2_"))},
           "TMPDIR": str(tmp_path), "DEVID_PKCS11_PIN": PIN}
    proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "bench", "--pkcs11", "--rounds", "1",
                           "--devices", "6", "--concurrency", "4", "--workers", "2", "--issue-count", "8",
                           "--provision-count", "3"], capture_output=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:] + proc.stdout.decode()[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] is True and summary["settings"]["pkcs11"] is True
    s = summary["pkcs11"]
    assert s["rounds"] == 1 and s["errors"] == 0 and s["module"].endswith("libsofthsm2.so")

    # 1. issuance from a CSR: both sides issued the same number of certificates
    i = s["issuance"]
    [r] = i["rounds"]
    assert i["certificates_per_side_and_round"] == 8
    for side in ("file", "token"):
        assert r[side]["certificates"] == 8 and _positive(r[side]["seconds"]) and _positive(r[side]["per_s"])
        assert i["median"][side]["per_s"] == r[side]["per_s"]
        assert _positive(i["operational_ca_signatures"]["per_s"][side])
    assert i["ratio"]["median"] == round(r["token"]["per_s"] / r["file"]["per_s"], 3)
    assert _positive(i["operational_ca_signatures"]["ratio"])

    # 2. provisioning: measured with --secure-element, else skipped and said so
    p = s["provisioning"]
    help_text = run_devid("provision", "--help").stdout.decode()
    if "--secure-element" in help_text:
        [r] = p["rounds"]
        assert p["identities_per_side_and_round"] == 3 and p["errors"] == []
        for side in ("software", "token"):
            assert r[side]["identities"] == 3 and _positive(r[side]["identities_per_s"])
            assert _positive(r[side]["wall_s"])
        assert p["ratio"]["median"] == round(r["token"]["identities_per_s"] / r["software"]["identities_per_s"], 3)
    else:
        assert p == {"skipped": "devid provision has no --secure-element"}

    # 3. enrollment against a token-backed and a file-backed gateway
    e = s["enrollment"]
    [r] = e["rounds"]
    assert e["workers"] == 2 and e["devices_per_side_and_round"] == 6 and e["errors"] == 0
    for side in ("file", "token"):
        assert r[side]["done"] == 6 and r[side]["errors"] == 0
        for key in ("per_s", "server_cpu_ms_per_op", "client_cpu_ms_per_op", "p95_ms"):
            assert _positive(r[side][key]), (side, key, r[side])
            assert e["median"][side][key] == r[side][key]
    assert e["ratios"]["rate"]["median"] == round(r["token"]["per_s"] / r["file"]["per_s"], 3)
    assert e["ratios"]["server_cpu"]["median"] == round(
        r["token"]["server_cpu_ms_per_op"] / r["file"]["server_cpu_ms_per_op"], 3)

    err = proc.stderr.decode()
    assert "issuance round 1" in err and "enrollment round 1" in err and "token / file" in err
    # the tokens' PIN is in no output, and the run's token directory is gone with its scratch directory
    assert PIN not in proc.stdout.decode() and PIN not in err
    assert not list(tmp_path.rglob("softhsm2.conf"))


def test_pkcs11_is_a_run_of_its_own():
    one_line_error(run_devid("bench", "--pkcs11", "--gateway", "coaps://127.0.0.1:5684"), "--gateway")
    one_line_error(run_devid("bench", "--pkcs11", "--workers-scaling"), "choose one")
    one_line_error(run_devid("bench", "--pkcs11", "--renew"), "--renew")
    one_line_error(run_devid("bench", "--issue-count", "5"), "--pkcs11")
    one_line_error(run_devid("bench", "--pkcs11", "--provision-count", "0"), "--provision-count")
