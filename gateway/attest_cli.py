"""`devid attest ...`: the attestation log and the verification policy, for operators.

    devid attest log [--device SERIAL] [--verdict V] [--since TIME] [--limit N] [--json]
    devid attest verify-log [--head SEQ:HASH] [--json]
    devid attest policy check [FILE]        (default: DATA/attestation-policy.toml)
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from attestation.errors import LogError
from attestation.log import verify_chain
from attestation.policy import Tier, load_policy

from . import output
from .attestation_store import SQLiteAttestationStore
from .datadir import DataDir, resolve_data_dir

POLICY_FILE = "attestation-policy.toml"
_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def policy_path(data: DataDir) -> Path:
    return data.path / POLICY_FILE


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC unless it has an offset), a date, or a duration back from now: 90s, 15m, 2h, 7d."""
    m = _RELATIVE.match(text.strip())
    if m:
        try:
            return (now or datetime.now(timezone.utc)) - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        except OverflowError:
            raise argparse.ArgumentTypeError(f"invalid time {text!r}: too far back") from None
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: use e.g. 2026-11-28, 2026-11-28T12:00:00Z, or 90s / 15m / 2h / 7d") from None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _head(text: str) -> tuple[int, str]:
    seq, sep, h = text.partition(":")
    if not sep or not seq.isdigit() or not re.fullmatch(r"[0-9a-f]{64}", h.lower()):
        raise argparse.ArgumentTypeError(f"invalid head {text!r}: expected SEQ:HASH (hash: 64 hex digits)")
    return int(seq), h.lower()


def _store(args, readonly: bool = True) -> SQLiteAttestationStore:
    data = DataDir(resolve_data_dir(args.data)).require()
    return SQLiteAttestationStore(data.open_registry(readonly=readonly))


def cmd_log(args) -> int:
    store = _store(args)
    tier = Tier(args.verdict) if args.verdict else None
    entries = store.log_entries(device_serial=args.device, tier=tier, since=args.since, limit=args.limit)
    if args.json:
        for e in entries:
            print(json.dumps(e.as_json()))
        return 0
    rows = []
    for e in entries:
        c = e.claims or {}
        firmware = f"{c['swname']} {c['swversion']}" if c else "-"
        rows.append((e.seq, e.time[:19] + "Z", e.device_serial, e.device_type, e.tier.value,
                     "yes" if e.acceptable else "no", firmware, ", ".join(e.codes) or "-"))
    output.table(["seq", "time", "device", "type", "verdict", "accepted", "firmware", "reasons"], rows)
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} shown")
    return 0


def cmd_verify_log(args) -> int:
    store = _store(args)
    report = verify_chain(store.iter_log())
    problems = list(report.problems)
    if args.head is not None:
        seq, want = args.head
        entry = store.entry(seq)
        if entry is None:
            problems.append((seq, f"recorded head entry {seq} is no longer in the log (truncated?)"))
        elif entry.hash.hex() != want:
            problems.append((seq, f"entry {seq} has hash {entry.hash.hex()}, not the recorded {want}"))
    if args.json:
        print(json.dumps({"ok": not problems, "entries": report.entries, "head_seq": report.head_seq,
                          "head_hash": report.head_hash.hex(),
                          "problems": [{"seq": s, "message": m} for s, m in problems]}))
    else:
        for _, message in problems:
            print(f"BROKEN: {message}")
        if not problems:
            print(f"OK: {report.entries} entries, chain intact; head {report.head_seq}:{report.head_hash.hex()}")
    if problems:
        raise LogError(f"attestation log verification failed: {len(problems)} problem(s)")
    return 0


def cmd_policy_check(args) -> int:
    path = Path(args.file) if args.file else policy_path(DataDir(resolve_data_dir(args.data)))
    policy = load_policy(path)
    if args.json:
        print(json.dumps({"ok": True, "file": str(path), "device_types": {
            name: {"attestation": t.attestation, "accept": t.accept.value,
                   "revoke_on_contraindicated": t.revoke_on_contraindicated,
                   "secure_boot_required": t.secure_boot_required,
                   "debug_disabled_required": t.debug_disabled_required,
                   "minimum_firmware_version": t.minimum_firmware_version,
                   "firmware": [{"name": f.name, "version": f.version, "digest": f.key, "deprecated": f.deprecated}
                                for f in t.firmware]}
            for name, t in policy.device_types.items()}}))
        return 0
    print(f"OK: {path}: {len(policy.device_types)} device type(s); nonce lifetime "
          f"{policy.nonce_lifetime.total_seconds():g} s, verdict window {policy.verdict_window.total_seconds():g} s, "
          f"max clock skew {policy.max_clock_skew.total_seconds():g} s"
          + (f", oemid {policy.oemid}" if policy.oemid is not None else ""))
    output.table(["device type", "attestation", "accept", "min firmware", "secure boot", "debug off",
                  "revoke", "firmware images"],
                 [(t.device_type, t.attestation, t.accept.value, t.minimum_firmware_version,
                   "required" if t.secure_boot_required else "-", "required" if t.debug_disabled_required else "-",
                   "yes" if t.revoke_on_contraindicated else "no",
                   f"{len(t.firmware)} ({sum(f.deprecated for f in t.firmware)} deprecated)")
                  for t in policy.device_types.values()])
    return 0


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    at = sub.add_parser("attest", parents=[common], help="the attestation log and verification policy")
    atsub = at.add_subparsers(dest="attest_command", metavar="ACTION", required=True, parser_class=type(at))

    s = atsub.add_parser("log", parents=[common], help="show attestation decisions, oldest first")
    s.add_argument("--device", metavar="SERIAL", help="only this device")
    s.add_argument("--verdict", choices=[t.value for t in Tier], help="only this verdict tier")
    s.add_argument("--since", type=parse_since, metavar="TIME",
                   help="only at or after TIME: 2026-11-28, 2026-11-28T12:00:00Z, or 90s / 15m / 2h / 7d ago")
    s.add_argument("--limit", type=_positive, metavar="N", help="only the newest N matching entries")
    s.add_argument("--json", action="store_true", help="one JSON object per line, with claims and evidence")
    s.set_defaults(func=cmd_log)

    s = atsub.add_parser("verify-log", parents=[common],
                         help="check the log's sequence numbers and hash chain; exit 1 if anything was changed")
    s.add_argument("--head", type=_head, metavar="SEQ:HASH",
                   help="a head printed by an earlier verify-log: also check it is still in the log")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify_log)

    pol = atsub.add_parser("policy", parents=[common], help="the verification policy file")
    polsub = pol.add_subparsers(dest="policy_command", metavar="ACTION", required=True, parser_class=type(pol))
    s = polsub.add_parser("check", parents=[common], help="validate a policy file and summarise it")
    s.add_argument("file", nargs="?", metavar="FILE", help=f"policy file (default: DATA/{POLICY_FILE})")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_policy_check)


