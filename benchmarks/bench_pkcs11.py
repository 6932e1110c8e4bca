"""`devid bench --pkcs11` (issue 15): keys in a PKCS#11 token (SoftHSM2) against keys in files.

Three measurements in one run, each side by side in alternating rounds (A B, B A, ...), each
reported as the median of the per-round ratios token / file with their range:

  issuance      certificates per second from a CSR: `CertificateAuthority.issue_operational`
                (CSR check, registry lookup, building, signing, the registry transaction) on a
                data directory made by `devid init --pkcs11` (the operational CA key in the token)
                against one made by `devid init` (an encrypted key file), each with its own SQLite
                registry and `--issue-count` registered devices; `--issue-count` certificates per
                side and round, in 4 alternating slices. Also, for scale: signatures per second of
                the two operational CA keys alone (`sign`, SHA-256).
  provisioning  identities per second of `devid provision --count --provision-count`, device keys
                generated in a token (`--secure-element URI`, a fresh token per round) against
                keys made in software, both with `--workers` processes on the file-backed CA; the
                rate is the command's own (`--json`: identities_per_s, without its start-up), the
                wall time of the command is given too. Skipped, and said so, where `devid provision`
                has no `--secure-element`.
  enrollment    the zero-touch enrollment against `devid serve --workers N` on the token-backed data
                directory and on the file-backed one, each with its own `--devices` fresh devices
                per round (bench_clients.run_clients: `--clients`, `--concurrency`, `--client`,
                `--flow`): enrollments/s, the gateway processes' CPU per enrollment (/proc), client
                CPU, p95, after an untimed warm-up of 4 enrollments per worker on each gateway
                (each worker opens its token session at its first signature: the module's
                re-initialisation after fork, the token lookup and the login are that warm-up's,
                whose server CPU is reported too).

The SoftHSM2 tokens live in the run's scratch directory: a token directory and a softhsm2.conf
there, named by $SOFTHSM2_CONF for this process and its subprocesses (set for the run and restored
after it). The tokens' user PIN is $DEVID_PKCS11_PIN if set, else a generated one put there for the
run (never printed, never in the JSON).
Every token is created before this process loads the module (a SoftHSM2 module sees only the
tokens that existed when it was initialised), but for the provisioning rounds' tokens, which only
subprocesses use.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import bench_cli
from bench_clients import run_clients
from bench_common import DEVICE_TYPE, bench_policy, bundle_dirs, start_gateway

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
ENV_CONF, ENV_PIN = "SOFTHSM2_CONF", "DEVID_PKCS11_PIN"
ISSUE_SLICES = 4
WARMUP_PER_WORKER = 4       # enrollments per gateway worker before the timed part (each worker's first
                            # use of the token: re-initialisation after fork, login), on both sides alike
SIDES = {"issuance": ("file", "token"), "provisioning": ("software", "token"), "enrollment": ("file", "token")}


def check(ap, args) -> None:
    """What --pkcs11 cannot be combined with, and what it needs on this machine."""
    for flag in ("gateway", "durability", "flood", "workers_scaling", "registry", "renew", "sql_cost"):
        if args.pkcs11 and getattr(args, flag):
            ap.error(f"--pkcs11 makes its own data directories, tokens and gateways: leave out "
                     f"--{flag.replace('_', '-')}")
    for flag in ("issue_count", "provision_count"):
        if getattr(args, flag) is not None and not args.pkcs11:
            ap.error(f"--{flag.replace('_', '-')} is a size of --pkcs11: use them together")
    if args.pkcs11:
        for n in ("issue_count", "provision_count"):
            if getattr(args, n) is not None and getattr(args, n) < 1:
                ap.error(f"--{n.replace('_', '-')} must be at least 1")
        if not Path(MODULE).exists() or shutil.which("softhsm2-util") is None:
            ap.error(f"--pkcs11 needs SoftHSM2 ({MODULE} and softhsm2-util: Debian's softhsm2, "
                     "./scripts/setup --test installs it)")


class SoftHSM:
    """A SoftHSM2 token directory in the run's scratch directory; $SOFTHSM2_CONF and
    $DEVID_PKCS11_PIN set for the run (`restore()` puts back what was there)."""

    def __init__(self, directory: Path) -> None:
        (directory / "tokens").mkdir(parents=True)
        self.conf = directory / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\n"
                             "log.level = ERROR\n")
        self.pin = os.environ.get(ENV_PIN) or secrets.token_hex(8)
        self._saved = {k: os.environ.get(k) for k in (ENV_CONF, ENV_PIN)}
        os.environ[ENV_CONF] = str(self.conf)
        os.environ[ENV_PIN] = self.pin

    def new_token(self, label: str) -> str:
        """A new token; its RFC 7512 URI (no PIN in it)."""
        proc = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                               "--so-pin", secrets.token_hex(8), "--pin", self.pin],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SystemExit(f"softhsm2-util could not make the token {label}: {proc.stderr.strip()[-300:]}")
        return f"pkcs11:token={label}?module-path={MODULE}"

    def restore(self) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def now() -> datetime:
    return datetime.now(timezone.utc)


def paired(rounds: list[dict], a: str, b: str, key: str) -> dict | None:
    """a / b per round (both ran in the same round): median, min and max; None without a pair."""
    pairs = [r[a][key] / r[b][key] for r in rounds if r[a].get(key) and r[b].get(key) is not None]
    if not pairs:
        return None
    return {"median": round(statistics.median(pairs), 3), "min": round(min(pairs), 3), "max": round(max(pairs), 3)}


def medians(rounds: list[dict], sides, keys) -> dict:
    def med(side, key):
        values = [r[side][key] for r in rounds if r[side].get(key) is not None]
        return round(statistics.median(values), 3) if values else None
    return {side: {k: med(side, k) for k in keys} for side in sides}


def orders(r: int, sides: tuple[str, str]) -> tuple[str, str]:
    return sides if r % 2 == 0 else sides[::-1]


# -- 1. issuance from a CSR ------------------------------------------------------------------------------

def _signatures(keys: dict, seconds: float = 0.5) -> dict:
    """Signatures/s of each operational CA key alone (SHA-256), alternating short blocks."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    counts, spent = dict.fromkeys(keys, 0), dict.fromkeys(keys, 0.0)
    for k in range(4):
        for side in (list(keys) if k % 2 == 0 else list(keys)[::-1]):
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds / 4:
                for _ in range(20):
                    keys[side].sign(b"m" * 300, ec.ECDSA(hashes.SHA256()))
                counts[side] += 20
            spent[side] += time.perf_counter() - t0
    rates = {side: round(counts[side] / spent[side], 1) for side in keys}
    return {"per_s": rates, "ratio": round(rates["token"] / rates["file"], 3)}


def issuance(args, work: Path, token_uri: str, report) -> dict:
    from issuance_runs import make_csr_pool, register_devices
    from devid.gateway.app.datadir import DataDir
    count = args.issue_count
    pool = min(count, 500)
    sides = {}
    report.stage(f"issuance: two data directories (CA keys in files; in the token), {pool} devices and CSRs each")
    csrs = make_csr_pool(pool)
    for side in SIDES["issuance"]:
        data = DataDir(work / f"issue-{side}")
        data.init(now(), pkcs11=token_uri if side == "token" else None)
        registry = data.open_registry()
        ca = data.authority(registry)
        devices = register_devices(ca, pool, now(), prefix=f"I{side[0].upper()}")
        sides[side] = (data, registry, ca, devices)
    try:
        key_type = type(sides["token"][0].issuer("operational").key).__name__
        if key_type != "TokenKey":
            raise SystemExit(f"the token-backed data directory's operational CA key is a {key_type}, not a TokenKey")
        at = now()
        slice_size = max(1, count // ISSUE_SLICES)
        rounds = []
        for r in range(args.rounds):
            got = {side: 0.0 for side in SIDES["issuance"]}
            for k in range(ISSUE_SLICES):
                for side in orders(r * ISSUE_SLICES + k, SIDES["issuance"]):
                    _, _, ca, devices = sides[side]
                    start = (r * ISSUE_SLICES + k) * slice_size
                    jobs = [(csrs[(start + i) % pool], devices[(start + i) % pool]) for i in range(slice_size)]
                    t0 = time.perf_counter()
                    for csr, serial in jobs:
                        ca.issue_operational(csr, serial, at)
                    got[side] += time.perf_counter() - t0
            done = slice_size * ISSUE_SLICES
            rounds.append({side: {"certificates": done, "seconds": round(s, 4), "per_s": round(done / s, 1)}
                           for side, s in got.items()})
            report.stage(f"issuance round {r + 1}: " + ", ".join(f"{side} {v['per_s']:,.0f}/s"
                                                                 for side, v in rounds[-1].items()))
        signatures = _signatures({side: sides[side][0].issuer("operational").key for side in SIDES["issuance"]})
    finally:
        for _, registry, _, _ in sides.values():
            registry.close()
    return {"certificates_per_side_and_round": slice_size * ISSUE_SLICES, "rounds": rounds,
            "median": medians(rounds, SIDES["issuance"], ("per_s",)),
            "ratio": paired(rounds, "token", "file", "per_s"), "operational_ca_signatures": signatures}


# -- 2. factory provisioning -----------------------------------------------------------------------------

def devid_cmd() -> list[str]:
    return [sys.executable, "-m", "devid.gateway.cli"]


def has_secure_element() -> bool:
    proc = subprocess.run([*devid_cmd(), "provision", "--help"], capture_output=True, text=True, timeout=120)
    return "--secure-element" in proc.stdout


def provisioning(args, work: Path, data_path: Path, hsm: SoftHSM, report) -> dict:
    if not has_secure_element():
        report.stage("provisioning: skipped (devid provision has no --secure-element here)")
        return {"skipped": "devid provision has no --secure-element"}
    count = args.provision_count
    rounds, errors = [], []
    env = dict(os.environ, DEVID_DATA=str(data_path))
    for r in range(args.rounds):
        got = {}
        for side in orders(r, SIDES["provisioning"]):
            extra = ["--secure-element", hsm.new_token(f"se-r{r + 1}")] if side == "token" else []
            cmd = [*devid_cmd(), "provision", "--count", str(count), "--device-type", DEVICE_TYPE,
                   "--out", str(work / "provision" / f"r{r + 1}-{side}"), "--serial-prefix", f"P{side[0].upper()}{r + 1}x",
                   "--workers", str(args.workers), "--json", *extra]
            report.stage(f"provisioning round {r + 1}, {side}: devid provision --count {count} "
                         f"--workers {args.workers}" + (" --secure-element URI" if extra else ""))
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                errors.append(f"{side}: {(proc.stderr.strip().splitlines() or ['exit ' + str(proc.returncode)])[-1]}")
                got[side] = {"identities": 0, "identities_per_s": None, "seconds": None, "wall_s": round(wall, 2)}
                continue
            try:
                out = json.loads(proc.stdout)
                n, seconds = int(out["count"]), float(out["seconds"])
            except (ValueError, KeyError, TypeError):
                errors.append(f"{side}: devid provision --json gave no count and seconds")
                got[side] = {"identities": 0, "identities_per_s": None, "seconds": None, "wall_s": round(wall, 2)}
                continue
            got[side] = {"identities": n, "identities_per_s": out.get("identities_per_s")
                         or (round(n / seconds, 1) if seconds else None),
                         "seconds": seconds, "wall_s": round(wall, 2), "wall_per_s": round(n / wall, 1)}
        rounds.append(got)
        report.stage(f"provisioning round {r + 1}: " + ", ".join(
            f"{side} {v['identities_per_s'] or 0:,.0f}/s" for side, v in got.items()))
    keys = ("identities_per_s", "wall_per_s")
    return {"identities_per_side_and_round": count, "workers": args.workers, "rounds": rounds,
            "median": medians(rounds, SIDES["provisioning"], keys),
            "ratio": paired(rounds, "token", "software", "identities_per_s"),
            "wall_ratio": paired(rounds, "token", "software", "wall_per_s"), "errors": errors}


# -- 3. enrollment ---------------------------------------------------------------------------------------

ENROLL_KEYS = ("per_s", "server_cpu_ms_per_op", "client_cpu_ms_per_op", "p95_ms")


def prepare_enrollment(work: Path, side: str, token_uri: str | None, devices: int, workers: int, report):
    """A data directory (CA keys in the token or in files) with `devices` provisioned devices.
    They are provisioned by `devid provision`, the command a factory runs, in a process of its own."""
    from devid.gateway.app.datadir import DataDir
    data = DataDir(work / f"enroll-{side}" / "data")
    report.stage(f"enrollment: a data directory with the CA keys in {'the token' if token_uri else 'files'}, "
                 f"{devices} devices")
    data.init(now(), pkcs11=token_uri)
    (data.path / "attestation-policy.toml").write_text(bench_policy())
    out = work / f"enroll-{side}" / "factory"
    proc = subprocess.run([*devid_cmd(), "provision", "--count", str(devices), "--device-type", DEVICE_TYPE,
                           "--out", str(out), "--serial-prefix", f"E{side[0].upper()}{os.getpid()}",
                           "--workers", str(workers), "--quiet"], capture_output=True, text=True,
                          env=dict(os.environ, DEVID_DATA=str(data.path)), timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"devid provision for the {side} side failed: "
                         f"{(proc.stderr.strip().splitlines() or ['exit ' + str(proc.returncode)])[-1]}")
    return data, bundle_dirs(out)


def enrollment(args, work: Path, token_uri: str, report) -> dict:
    warm = WARMUP_PER_WORKER * args.workers
    prepared = {side: prepare_enrollment(work, side, token_uri if side == "token" else None,
                                         (args.devices + warm) * args.rounds, args.workers, report)
                for side in SIDES["enrollment"]}
    step = args.devices + warm
    chunks = {side: iter([(b[i:i + warm], b[i + warm:i + step]) for i in range(0, len(b), step)])
              for side, (_, b) in prepared.items()}
    rounds, errors = [], 0
    for r in range(args.rounds):
        got = {}
        for side in orders(r, SIDES["enrollment"]):
            warmup, timed = next(chunks[side])
            served = start_gateway(prepared[side][0].path, args.workers, args.server_root)
            try:
                first = run_clients(served.uri, warmup, served.pids, clients=1, concurrency=min(4, len(warmup)),
                                    client=args.client, loop=args.client_loop, flow=args.flow,
                                    label=f"round {r + 1}, CA keys in {side}, warm-up (untimed): ")
                run = run_clients(served.uri, timed, served.pids, clients=args.clients,
                                  concurrency=args.concurrency, client=args.client, loop=args.client_loop,
                                  flow=args.flow, label=f"round {r + 1}, CA keys in {side}: ")
            finally:
                served.stop()
            errors += run["errors"] + first["errors"]
            got[side] = {"done": run["done"], "errors": run["errors"], "per_s": run["per_s"],
                         "server_cpu_ms_per_op": run["server_cpu_ms_per_op"],
                         "client_cpu_ms_per_op": run["client_cpu_ms_per_op"], "p95_ms": run["latency_ms"]["p95"],
                         "warmup_devices": len(warmup), "warmup_server_cpu_ms_per_op": first["server_cpu_ms_per_op"],
                         **({"first_failures": run["first_failures"]} if run.get("first_failures") else {})}
        rounds.append(got)
        report.stage(f"enrollment round {r + 1}: " + ", ".join(
            f"{side} {v['per_s'] or 0:.1f}/s, server CPU {v['server_cpu_ms_per_op'] or 0:.3f} ms"
            for side, v in got.items()))
    return {"workers": args.workers, "devices_per_side_and_round": args.devices, "rounds": rounds,
            "median": medians(rounds, SIDES["enrollment"], ENROLL_KEYS),
            "ratios": {"server_cpu": paired(rounds, "token", "file", "server_cpu_ms_per_op"),
                       "rate": paired(rounds, "token", "file", "per_s"),
                       "client_cpu": paired(rounds, "token", "file", "client_cpu_ms_per_op")},
            "errors": errors}


# -- the run ---------------------------------------------------------------------------------------------

def _ratio(x: dict | None) -> str:
    return "-" if x is None else f"{x['median']:.3f} ({x['min']:.3f}..{x['max']:.3f})"


def lines(result: dict) -> list[str]:
    """The summary for people (stderr): each figure's medians and its token / file ratio."""
    i, p, e = result["issuance"], result["provisioning"], result["enrollment"]
    out = [f"token / file, median of {result['rounds']} paired rounds (min..max):",
           f"  issuance from a CSR      {i['median']['file']['per_s']:>9,.0f}/s file  "
           f"{i['median']['token']['per_s']:>9,.0f}/s token   ratio {_ratio(i['ratio'])}",
           f"  operational CA signature {i['operational_ca_signatures']['per_s']['file']:>9,.0f}/s file  "
           f"{i['operational_ca_signatures']['per_s']['token']:>9,.0f}/s token   ratio "
           f"{i['operational_ca_signatures']['ratio']:.3f}"]
    if "skipped" in p:
        out.append(f"  provisioning             skipped: {p['skipped']}")
    else:
        out.append(f"  provisioning             {p['median']['software']['identities_per_s'] or 0:>9,.0f}/s soft  "
                   f"{p['median']['token']['identities_per_s'] or 0:>9,.0f}/s token   ratio {_ratio(p['ratio'])}")
    m = e["median"]
    out.append(f"  enrollment ({e['workers']} worker(s))  {m['file']['per_s'] or 0:>9,.1f}/s file  "
               f"{m['token']['per_s'] or 0:>9,.1f}/s token   ratio {_ratio(e['ratios']['rate'])}")
    out.append(f"  server CPU per enrollment {m['file']['server_cpu_ms_per_op'] or 0:>8.3f} ms file "
               f"{m['token']['server_cpu_ms_per_op'] or 0:>8.3f} ms token  ratio {_ratio(e['ratios']['server_cpu'])}"
               f" (client CPU ratio {_ratio(e['ratios']['client_cpu'])})")
    return out


def main(ap, args) -> int:
    import platform
    check(ap, args)
    args.issue_count = args.issue_count or 1000
    args.provision_count = args.provision_count or 200
    report = bench_cli.REPORT
    work, temporary = bench_cli.workdir(ap, args.workdir)
    hsm = None
    try:
        hsm = SoftHSM(work / "softhsm")
        # both tokens this process uses exist before it loads the module (see the docstring)
        issue_token, enroll_token = hsm.new_token("bench-issue"), hsm.new_token("bench-enroll")
        load_start = os.getloadavg()
        started = time.perf_counter()
        result: dict = {"module": MODULE, "rounds": args.rounds}
        result["issuance"] = issuance(args, work, issue_token, report)
        result["provisioning"] = provisioning(args, work, work / "issue-file", hsm, report)
        result["enrollment"] = enrollment(args, work, enroll_token, report)
        result["errors"] = result["enrollment"]["errors"] + len(result["provisioning"].get("errors", []))
        result["load"] = {"start": load_start, "end": os.getloadavg()}
        result["seconds"] = round(time.perf_counter() - started, 1)
        summary = {"machine": {"python": platform.python_version(), "nproc": os.cpu_count(),
                               "softhsm2": _softhsm_version()},
                   "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "pkcs11": result}
        for line in lines(result):
            report.stage(line)
        failed = result["errors"]
        return bench_cli.emit(summary, f"{failed} enrollment(s) or provisioning run(s) failed: "
                                       + "; ".join(result["provisioning"].get("errors", [])[:2]) if failed else None)
    finally:
        if hsm is not None:
            hsm.restore()
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
        else:
            report.stage(f"kept {work}")


def _softhsm_version() -> str | None:
    try:
        return subprocess.run(["softhsm2-util", "--version"], capture_output=True, text=True,
                              timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
