#!/usr/bin/env python3
"""Issuance and provisioning throughput of devid, measured side by side with bare `cryptography`.

    .venv/bin/python benchmarks/bench_issuance.py [--seconds S] [--rounds R] [--provision-count N] [--json]

Shared machines are noisy, so no figure here is an absolute measurement on its own: every devid
figure is taken in the same run as its baseline, interleaved in rounds (the order alternates from
round to round), and the result is the median over the rounds. Ratios and overheads are medians of
the per-round *paired* ratios, which cancels most of the drift between rounds.

1. issue: `CertificateAuthority.issue_operational(csr_der, serial, now)` on a real data directory
   (CSR parsing and signature check, key policy, registry lookup, the 7 extensions, signing, and
   the SQLite transaction), against the bare `cryptography` recipe producing the same certificate
   (load DER CSR, is_signature_valid, same subject, same 7 extensions, same P-256 issuer key,
   serialize to DER). Single process, one core. Target: devid overhead <= 20 %.
2. provision: `gateway.provisioning.provision()` of N identities into a directory with its default
   workers (one process per CPU), against the bare work in one process (P-256 key, factory
   certificate with the same extensions, the same five files per device, no registry). Target:
   >= 1,000 identities/s. An informational row runs provision(workers=1): devid's per-core overhead.

An informational third side runs issue_operational with the registry stubbed out (a dict lookup
and no recording), which splits devid's overhead into its CA code and its SQLite recording.

A benchmark, not a test: it checks once that both sides produce equivalent certificates, then
only measures. `--profile` adds a cProfile breakdown of devid's two code paths. A file-creation
probe at start and end flags a slow file system (see fs_create_probe), which would make the
provisioning figures measure the disk rather than devid. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:            # its modules (issuance_*.py), also when imported from elsewhere
    sys.path.insert(0, HERE)

from issuance_base import CSR_POOL, MIN_ROUNDS, log, sync  # noqa: E402
from issuance_facts import fs_create_probe, machine_facts  # noqa: E402
from issuance_report import render_table  # noqa: E402
from issuance_runs import Bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=12.0,
                   help="total measuring time of the issuance benchmark, all sides, all rounds (default 12)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per benchmark (default 5)")
    p.add_argument("--provision-count", type=int, default=2000, metavar="N",
                   help="identities provisioned per side per round (default 2000)")
    p.add_argument("--provision-budget", type=float, default=25.0, metavar="S",
                   help="stop the provisioning rounds early once they would exceed S seconds (a slow file "
                        f"system), after at least {MIN_ROUNDS} rounds (default 25)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--dir", type=Path, default=None,
                   help="parent of the temporary data directory (default: the system temp dir)")
    p.add_argument("--only", choices=("issue", "provision"), help="run one of the two benchmarks")
    p.add_argument("--profile", action="store_true",
                   help="also print a cProfile breakdown of devid's issue_operational and provision (stderr)")
    p.add_argument("--cpu", type=int, default=None, metavar="N",
                   help="pin the process to CPU N (default: let the scheduler choose)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.rounds < 1 or args.seconds <= 0 or args.provision_count < 1:
        p.error("--rounds, --seconds and --provision-count must be positive")

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="devid-bench-", dir=args.dir))
    facts = machine_facts(workdir)
    facts["fs_create_us_start"] = fs_create_probe(workdir)
    os.environ.pop("DEVID_CA_PASSPHRASE", None)     # a generated passphrase in the temp dir
    results = []
    try:
        log(f"workdir {workdir}")
        bench = Bench(workdir)
        try:
            if args.only in (None, "issue"):
                bench.setup_issue(CSR_POOL)
                results.extend(bench.run_issue(args.seconds, args.rounds))
            if args.only in (None, "provision"):
                results.extend(bench.run_provision(args.provision_count, args.rounds, args.provision_budget))
            facts["fs_create_us_end"] = fs_create_probe(workdir)
            if args.profile:
                if not bench.csrs:
                    bench.setup_issue(CSR_POOL)
                log(bench.profile(3000, args.provision_count, 30))
        finally:
            bench.close()
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            log("removing the temporary directory")
            shutil.rmtree(workdir, ignore_errors=True)
            sync()     # written-back inode tables shorten ext4's recently-deleted window to 60 s
            log("done")

    facts["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    config = {"seconds": args.seconds, "rounds": args.rounds, "provision_count": args.provision_count,
              "provision_budget": args.provision_budget, "cpu": args.cpu, "csr_pool": CSR_POOL,
              "elapsed_s": time.perf_counter() - started,
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if args.json:
        print(json.dumps({"machine": facts, "config": config, "results": results}, indent=2))
    else:
        print(render_table(results, facts, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
