"""The device commands (`devid enroll`, `renew`, `fetch-config`, `simulate`) and `devid provision`
as a field engineer and a factory run them: real processes against the real gateway (`devid
serve`), or against addresses where no gateway answers.

- an unreachable gateway (a closed port, a socket that never answers) fails at step `connect`,
  in one line, with no traceback anywhere (issue 12, item 15);
- `devid simulate` without firmware warns as `devid enroll` does and never prints NaN (item 11);
- a configuration step that fails after the certificate was stored exits 3 and names the
  command that fetches the configuration, which then works (item 17);
- `devid provision` keeps key material out of the directory it runs in, in private modes, and the
  repository's .gitignore covers every path the docs write keys to (item 19)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from devid.ca.identity import format_serial
from devid.ca.store import CertStatus, DeviceState
from devid.gateway.device.simulator import SimulationReport
from devid.gateway.device.stats import finite, median

from .conftest import free_port, ok, one_line_error, run_devid, tool
from .gateway_helpers import FW
from .serve_helpers import serving

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ["--firmware-digest", FW.digest.hex(), "--firmware-name", FW.name, "--firmware-version", FW.version]


def strict_json(text: str):
    """JSON as the RFC has it: NaN and the infinities are refused."""
    def refuse(constant):
        raise AssertionError(f"{constant} in JSON output: {text}")
    return json.loads(text, parse_constant=refuse)


def no_traceback(proc) -> None:
    out = proc.stdout.decode() + proc.stderr.decode()
    assert "Traceback" not in out and "Exception" not in out, out


def free_port6() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


def as_operational(bundle: Path) -> None:
    """Give a bundle an operational identity (its factory one, copied): enough for `renew` and
    `fetch-config` to get past their bundle check and try to connect."""
    shutil.copy(bundle / "chain.pem", bundle / "op-chain.pem")
    shutil.copy(bundle / "key.pem", bundle / "op-key.pem")


# -- item 15: an unreachable gateway ----------------------------------------------------------------------

def test_an_unreachable_gateway_fails_at_connect_in_one_line(bundles):
    out = bundles
    bundle = out / "SN00000001"
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)      # bound, never read, never answers
    blackhole.bind(("127.0.0.1", 0))
    try:
        silent = blackhole.getsockname()[1]
        closed, closed6 = free_port(), free_port6()
        targets = {f"coaps://127.0.0.1:{closed}": f"127.0.0.1 port {closed}",
                   f"coaps://[::1]:{closed6}": f"::1 port {closed6}",
                   f"coaps://127.0.0.1:{silent}": f"127.0.0.1 port {silent}"}
        for uri, where in targets.items():
            # with firmware the first request would be the nonce: the failure is the handshake's
            proc = run_devid("enroll", "--gateway", uri, "--device", bundle, "--timeout", "1", *FIRMWARE)
            one_line_error(proc, "enrollment failed at step connect: ", f"no answer from {where} within 1 s")
            no_traceback(proc)
            assert proc.returncode == 1
        assert not (bundle / "op-key.pem").exists()          # nothing stored

        uri = f"coaps://127.0.0.1:{silent}"
        proc = run_devid("simulate", "--gateway", uri, "--devices", out, "--timeout", "1", *FIRMWARE)
        no_traceback(proc)
        assert proc.returncode == 1
        text = proc.stdout.decode()
        assert "0/3 devices enrolled" in text and "nan" not in text.lower()
        assert text.count(f": connect: no answer from 127.0.0.1 port {silent} within 1 s") == 3, text

        one_line_error(run_devid("fetch-config", "--gateway", uri, "--device", bundle),
                       "fetching the configuration failed at step bundle: ", "(enroll the device first)")
        as_operational(bundle)
        for command, failed in (("renew", "renewal failed"), ("fetch-config", "fetching the configuration failed")):
            proc = run_devid(command, "--gateway", uri, "--device", bundle, "--timeout", "1")
            one_line_error(proc, f"{failed} at step connect: no answer from 127.0.0.1 port {silent} within 1 s")
            no_traceback(proc)
    finally:
        blackhole.close()


# -- items 11 and 17 against `devid serve` -----------------------------------------------------------------

@pytest.fixture
def gateway(world, tmp_path):
    data, out = world
    with serving(data.path, tmp_path / "serve.log") as served:
        yield data, out, served


def test_simulate_without_firmware_warns_and_never_prints_nan(gateway, tmp_path):
    data, out, served = gateway
    sensors = tmp_path / "sensors"               # temperature sensors: their policy asks for evidence
    sensors.mkdir()
    for name in ("TS00000001", "TS00000002"):
        shutil.copytree(out / name, sensors / name)
    base = ["simulate", "--gateway", served.uri, "--devices", sensors, "--timeout", "10"]

    proc = run_devid(*base)
    no_traceback(proc)
    text = proc.stdout.decode()
    assert proc.returncode == 1
    assert text.splitlines()[0] == ("no firmware given (no --firmware or --firmware-digest, no firmware.json in the "
                                    "bundle): enrolling without attestation evidence (only for device types whose "
                                    "policy waives it)")
    assert "0/2 devices enrolled" in text and "no device succeeded, so no latency figures; 2 failed" in text
    assert "enroll: 4.03 Forbidden attestation required" in text
    assert "nan" not in text.lower()

    proc = run_devid(*base, "--json")
    summary = strict_json(proc.stdout.decode())
    assert proc.returncode == 1
    assert summary["enrolled"] == 0 and summary["errors"] == 2
    assert summary["latency_ms"] == {"p50": None, "p95": None, "p99": None} and summary["mean_ms"] is None
    assert "no firmware given" in proc.stderr.decode()         # stdout stays one JSON document

    # some with firmware (firmware.json), some without (a type whose policy waives attestation)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copytree(out / "TS00000003", mixed / "TS00000003")
    (mixed / "TS00000003" / "firmware.json").write_text(json.dumps(
        {"name": FW.name, "version": FW.version, "digest": f"sha-256:{FW.digest.hex()}"}))
    shutil.copytree(out / "LG00000001", mixed / "LG00000001")
    proc = run_devid("simulate", "--gateway", served.uri, "--devices", mixed, "--timeout", "10", "--json")
    summary = strict_json(proc.stdout.decode())
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert summary["enrolled"] == 2 and all(v > 0 for v in summary["latency_ms"].values())
    assert "no firmware given for 1 of 2 devices" in proc.stderr.decode()

    # `devid enroll --json` without firmware: the same warning, on stderr; the handshake is a step
    proc = run_devid("enroll", "--gateway", served.uri, "--device", out / "LG00000001", "--json")
    result = strict_json(proc.stdout.decode())
    assert proc.returncode == 0 and result["verdict"] is None
    assert list(result["steps_ms"]) == ["connect", "enroll", "config"]
    assert proc.stderr.decode().startswith("no firmware given: enrolling without attestation evidence")


def test_summaries_of_runs_where_nothing_succeeded_are_json():
    """The simulator's and the load generator's summaries with no successful device: null where a
    statistic is undefined, so that strict JSON (allow_nan=False) takes them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import loadgen
    empty = SimulationReport(devices=3, enrolled=0, failures={"A": "connect: no answer"}, seconds=1.0)
    assert empty.percentile(50) is None
    summary = strict_json(json.dumps(empty.summary(), allow_nan=False))
    assert summary["latency_ms"] == {"p50": None, "p95": None, "p99": None} and summary["mean_ms"] is None
    lean = strict_json(json.dumps(loadgen.Report(failures={"A": "connect: x"}, seconds=1.0).summary(),
                                  allow_nan=False))
    assert lean["latency_ms"] == {"p50": None, "p95": None, "p99": None} and lean["client_cpu_ms_per_op"] is None
    # what `devid bench` rounds for its baselines and medians
    assert [finite(v, 3) for v in (float("nan"), float("inf"), None, 1.23456)] == [None, None, None, 1.235]
    assert median([None, float("nan")]) is None and median([None, 2.0, 4.0]) == 3.0


def test_enroll_exits_3_when_only_the_configuration_failed(gateway):
    data, out, served = gateway
    bundle = out / "TS00000004"
    template = data.path / "config" / "temperature-sensor.toml"
    template.write_text("[endpoints\n")                  # invalid TOML: the gateway answers /config with 5.03

    # the classic flow fetches the configuration with GET /config after /sen (the one-request flow
    # gets it in the /sen answer: test_one_request_cli.py)
    proc = run_devid("enroll", "--gateway", served.uri, "--device", bundle, "--timeout", "10", *FIRMWARE,
                     "--flow", "classic")
    err = one_line_error(proc, "enrolled, but the configuration could not be fetched "
                               "(5.03 Service Unavailable configuration unavailable)", f"is stored in {bundle} ")
    no_traceback(proc)
    assert proc.returncode == 3
    assert "[3/4] enroll    operational certificate" in proc.stdout.decode()
    # the certificate is the device's: stored, current in the registry, the device enrolled
    cert = x509.load_pem_x509_certificate((bundle / "op-cert.pem").read_bytes())
    assert f"operational certificate {format_serial(cert.serial_number)} is stored" in err   # as openssl prints it
    assert stat.S_IMODE((bundle / "op-key.pem").stat().st_mode) == 0o600
    assert not (bundle / "config.cbor").exists()
    reg = data.open_registry(readonly=True)
    try:
        assert reg.get_device("TS00000004").state is DeviceState.ENROLLED
        current = [c for c in reg.certificates_for_device("TS00000004")
                   if c.profile == "operational" and c.status is CertStatus.CURRENT]
        assert [c.serial for c in current] == [cert.serial_number]
    finally:
        reg.close()

    # the command the message names fetches the configuration once the template is mended
    command = err.split("get the configuration with: ", 1)[1]
    args = shlex.split(command)
    assert args[:2] == ["devid", "fetch-config"]
    one_line_error(run_devid(*args[1:]), "fetching the configuration failed at step config: 5.03")
    template.unlink()
    text = ok(run_devid(*args[1:]))
    assert text.startswith("OK: configuration for temperature-sensor (")
    config = json.loads((bundle / "config.json").read_text())
    assert config["device"] == "TS00000004" and (bundle / "config.cbor").exists()
    assert x509.load_pem_x509_certificate((bundle / "op-cert.pem").read_bytes()) == cert     # not enrolled again


# -- item 19: key material out of the working tree -----------------------------------------------------

def test_provision_writes_bundles_into_the_data_directory_in_private_modes(tmp_path):
    checkout = tmp_path / "checkout"              # where the README's commands run
    checkout.mkdir()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data)

    def devid(*args):
        return subprocess.run([sys.executable, "-m", "devid.gateway.cli", *map(str, args)], capture_output=True,
                              text=True, env=env, cwd=checkout, timeout=120)
    assert devid("init").returncode == 0
    old = os.umask(0o022)
    try:
        proc = devid("provision", "--count", "3", "--device-type", "temperature-sensor", "--quiet")
        explicit = devid("provision", "--count", "1", "--device-type", "meter", "--quiet", "--out", tmp_path / "new")
    finally:
        os.umask(old)
    assert proc.returncode == 0 and explicit.returncode == 0, proc.stderr + explicit.stderr
    assert proc.stdout.rstrip().endswith(f"-> {data / 'factory'}")
    assert list(checkout.iterdir()) == []             # nothing written where the command ran
    for out, serials in ((data / "factory", ["SN00000001", "SN00000002", "SN00000003"]),
                         (tmp_path / "new", ["SN00000004"])):
        assert stat.S_IMODE(out.stat().st_mode) == 0o700
        assert sorted(p.name for p in out.iterdir()) == serials
        for serial in serials:
            assert stat.S_IMODE((out / serial).stat().st_mode) == 0o700
            assert stat.S_IMODE((out / serial / "key.pem").stat().st_mode) == 0o600


def test_gitignore_covers_every_place_the_docs_put_keys(tmp_path):
    """The repository's .gitignore, in a fresh repository: the data directory, the bundles (default
    and `--out factory/`), and key files by the names devid and the docs use; not the source."""
    git = tool("git")
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    subprocess.run([git, "init", "-q", str(repo)], check=True)
    keys = ["devid-data/factory/TS00000001/key.pem", "devid-data/factory/TS00000001/op-key.pem",
            "devid-data/ca/root.key.pem", "devid-data/ca/passphrase", "factory/TS00000001/key.pem",
            "factory/TS00000001/cert.pem", "op-key.pem", "sim/TS00000001/key.pem", "sim/TS00000001/op-key.pem"]
    source = ["gateway/factory/provisioning.py", "gateway/factory/new_module.py", "docs/certificates.md"]
    proc = subprocess.run([git, "-C", str(repo), "check-ignore", "--no-index", *keys, *source],
                          capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == sorted(keys)
