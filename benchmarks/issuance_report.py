"""What the issuance benchmark prints: the results table (with the machine facts and a warning
when the file system was slow) and the cProfile breakdown."""

from __future__ import annotations

import pstats
from pathlib import Path

from issuance_base import ROOT, SLOW_CREATE_US


def _func_name(key: tuple) -> str:
    filename, line, name = key
    if filename == "~":
        return name
    path = Path(filename)
    try:
        where = str(path.relative_to(ROOT))
    except ValueError:
        where = path.name
    if "site-packages" in filename:
        where = filename.split("site-packages/", 1)[1]
    elif "/lib/python" in filename:
        where = "stdlib/" + path.name
    return f"{where}:{line}({name})"


def format_profile(stats: pstats.Stats, title: str, top: int) -> str:
    raw = stats.stats    # {(file, line, func): (cc, ncalls, tottime, cumtime, callers)}
    total = stats.total_tt or 1e-9
    out = [f"\n=== cProfile: {title}: {total:.3f} s profiled ===",
           f"{'own %':>6} {'cum %':>6} {'calls':>8}  function (top {top} by own time)"]
    for key, (cc, nc, tt, ct, callers) in sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]:
        out.append(f"{tt / total:6.1%} {ct / total:6.1%} {nc:8d}  {_func_name(key)}")
    out.append("-- devid functions, cumulative (time inside them, callees included) --")
    own_code = [(key, v) for key, v in raw.items()
                if key[0].startswith(str(ROOT)) and "/benchmarks/" not in key[0]]
    for key, (cc, nc, tt, ct, callers) in sorted(own_code, key=lambda kv: -kv[1][3])[:top]:
        out.append(f"{tt / total:6.1%} {ct / total:6.1%} {nc:8d}  {_func_name(key)}")
    return "\n".join(out) + "\n"


def render_table(results: list[dict], facts: dict, config: dict) -> str:
    head = ("operation", "devid /s", "baseline /s", "ratio", "overhead (min..max)", "rounds", "target", "met?")
    rows = []
    for r in results:
        rows.append((r["operation"], f"{r['devid_per_s']:,.0f}", f"{r['baseline_per_s']:,.0f}",
                     f"{r['ratio']:.3f}",
                     f"{r['overhead']:+.1%} ({r['overhead_min']:+.1%}..{r['overhead_max']:+.1%})",
                     len(r["rounds"]), r["target"], "-" if r["met"] is None else "yes" if r["met"] else "NO"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)   # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append("")
    out.append("ratio = devid rate / baseline rate; overhead = devid time / baseline time - 1;")
    out.append("each a median over interleaved paired rounds (min..max: the spread of the rounds)")
    out.append(f"python {facts['python']} ({facts['python_implementation']}), cryptography {facts['cryptography']}, "
               f"{facts['openssl']}, sqlite {facts['sqlite']}")
    dirty = facts.get("devid_uncommitted") or []
    out.append(f"devid {facts.get('devid_commit')}" + (f" + uncommitted {', '.join(dirty)}" if dirty else ""))
    out.append(f"nproc {facts['nproc']} (cpu_count {facts['cpu_count']}), {facts['cpu']}, {facts['platform']}")
    la_s = facts.get("loadavg_start") or []
    la_e = facts.get("loadavg_end") or []
    out.append(f"workdir fs {facts['workdir_fs']}; load average start {' '.join(f'{x:.2f}' for x in la_s)}, "
               f"end {' '.join(f'{x:.2f}' for x in la_e)}; total {config['elapsed_s']:.1f} s")
    probe = [facts.get("fs_create_us_start"), facts.get("fs_create_us_end")]
    out.append("file create+write+close: " + " / ".join("-" if v is None else f"{v:.0f} us" for v in probe) +
               " (start / end)")
    if any(v is not None and v > SLOW_CREATE_US for v in probe):
        out.append(f"WARNING: file creation is slow here (> {SLOW_CREATE_US} us/file; an idle local disk takes "
                   "~10-20 us): the provisioning rates")
        out.append("measure the file system as much as devid. On ext4 without a journal this follows many recent "
                   "deletions (a test suite,")
        out.append("another run's cleanup): wait a minute and rerun, or compare with --dir /dev/shm (no disk).")
    return "\n".join(out)
