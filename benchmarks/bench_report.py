"""The flow's cost in `devid bench`'s summary: per enrollment and per renewal, the datagrams and
CoAP exchanges its timed run counted (bench_counts.py) and the write transactions of its write
probe (bench_wal.py), how each was counted, and a few lines for people on stderr."""

from __future__ import annotations

MODES = ("enroll", "renew")


def counting(probe_devices: int) -> dict:
    """How the summary's flow figures were counted (part of the summary)."""
    return {
        "datagrams_per_op": "counted by the lean load generator's DTLS sessions over the timed run, divided by the "
                            "operations done: sent and received, the handshake's apart from the rest (CoAP messages, "
                            "close_notify); retransmissions included (benchmarks/bench_counts.py). Not counted for "
                            "--client script",
        "coap_exchanges_per_op": "confirmable requests with a new Message ID, counted by the same sessions (a Block2 "
                                 "continuation is an exchange, a retransmission is not)",
        "write_transactions_per_op": f"committed write transactions on the registry: commit frames in its WAL while "
                                     f"{probe_devices} more devices enrolled (renewed) one at a time, before the "
                                     f"timed runs (write_probe; benchmarks/bench_wal.py); wal_frames_per_op: the "
                                     f"pages those transactions wrote",
    }


def flow_costs(summary: dict, probe_devices: int) -> None:
    """Adds the write probe's figures to each mode's summary, and `counting`."""
    probe = summary.get("write_probe")
    for mode in MODES:
        run = summary.get(mode)
        if run is None:
            continue
        run.setdefault("datagrams_per_op", None)
        run.setdefault("coap_exchanges_per_op", None)
        got = (probe or {}).get(mode) or {}
        done, commits = got.get("done"), got.get("commits")
        run["write_transactions_per_op"] = round(commits / done, 2) if done and commits is not None else None
        run["wal_frames_per_op"] = round(got["frames"] / done, 2) if done and commits is not None else None
    summary["counting"] = counting(probe_devices)


def _count(x: float, noun: str) -> str:
    return f"{x:g} {noun}{'' if x == 1 else 's'}"


def _flow_line(run: dict, noun: str) -> str:
    parts = []
    d = run.get("datagrams_per_op")
    if d:
        hs, after = d["handshake"], d["after_handshake"]
        parts.append(f"{d['total']:g} datagrams (handshake {hs['sent']:g} sent + {hs['received']:g} received, "
                     f"then {after['sent']:g} + {after['received']:g})")
    if run.get("coap_exchanges_per_op") is not None:
        parts.append(_count(run["coap_exchanges_per_op"], "CoAP exchange"))
    if run.get("write_transactions_per_op") is not None:
        parts.append(f"{_count(run['write_transactions_per_op'], 'write transaction')} "
                     f"({run['wal_frames_per_op']:g} WAL pages)")
    return f"  per {noun}: " + (", ".join(parts) if parts else "datagrams and writes not counted")


def show(report, summary: dict) -> None:
    """The summary's main figures as a few progress lines (stderr; nothing when quiet)."""
    floor = (summary.get("crypto_floor") or {}).get("ms_per_enrollment")
    for mode, noun in (("enroll", "enrollment"), ("renew", "renewal")):
        run = summary.get(mode)
        if run is None or not run["done"]:
            continue
        cpu = run["server_cpu_ms_per_op"]
        line = f"summary: {mode} {run['per_s']}/s, p95 {run['latency_ms']['p95']} ms, server CPU {cpu} ms per {noun}"
        if floor and cpu:
            line += f" ({cpu / floor:.2f}x the crypto floor of {floor} ms)"
        report.stage(line)
        report.stage(_flow_line(run, noun))
    probe = summary.get("write_probe")
    for mode in MODES:
        problem = ((probe or {}).get(mode) or {}).get("problem")
        if problem:
            report.stage(f"  write probe ({mode}): not counted: {problem}")
