"""`devid attest ...`: the attestation log and the verification policy, for operators.

    devid attest log [--device SERIAL] [--verdict V] [--since TIME] [--limit N] [--json]
    devid attest log rotate [--before TIME] [--out DIR] [--segment-entries N] [--json]
    devid attest verify-log [--head SEQ:HASH] [--segments DIR]... [--require-segments] [--json]
    devid attest policy check [FILE]        (default: DATA/attestation-policy.toml)

`attest log` reads the registry only; rotated entries are in the segment files
(DATA/attestation-log/ by default), which `verify-log` checks with the registry's anchor rows.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from devid.attestation.errors import LogError
from devid.attestation.log import LogEntry
from devid.attestation.policy import Tier, load_policy

from devid.gateway.cli import output
from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.app.datadir import DataDir, resolve_data_dir
from devid.gateway.store.log_rotation import DEFAULT_SEGMENT_ENTRIES, LOCK_FILE, SEGMENT_DIR, rotate
from devid.gateway.store.log_verify import ARCHIVED, PENDING, verify_log

POLICY_FILE = "attestation-policy.toml"
# without a policy file, rotation keeps the longest verdict window a policy may set
# (settings.verdict_window_seconds is at most 86400)
MAX_VERDICT_WINDOW = timedelta(seconds=86400)
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


def _head(text: str) -> tuple[int, str]:
    seq, sep, h = text.partition(":")
    if not sep or not seq.isdigit() or not re.fullmatch(r"[0-9a-f]{64}", h.lower()):
        raise argparse.ArgumentTypeError(f"invalid head {text!r}: expected SEQ:HASH (hash: 64 hex digits)")
    return int(seq), h.lower()


def _store(args, readonly: bool = True) -> AttestationStore:
    data = DataDir(resolve_data_dir(args.data)).require()
    return AttestationStore(data.open_registry(readonly=readonly))


def _summary_text(e: LogEntry) -> str:
    s = e.summary
    counts = ", ".join(f"{code} {n}" for code, n in sorted(s.reason_counts, key=lambda p: (-p[1], p[0])))
    return f"{s.count} more refused between {s.first[:19]}Z and {s.last[:19]}Z ({counts or 'no reasons'})"


def cmd_log(args) -> int:
    store = _store(args)
    tier = Tier(args.verdict) if args.verdict else None
    entries = store.log_entries(device_serial=args.device, tier=tier, since=args.since, limit=args.limit)
    pending = {serial: t for serial, t in store.refused_tallies().items()
               if t.suppressed and (args.device is None or serial == args.device)}
    segments = store.segments()
    if args.json:
        output.emit({"ok": True, "entries": [e.as_json() for e in entries],
                     "unsummarised_refusals": {serial: t.suppressed for serial, t in sorted(pending.items())},
                     "rotated": {"segments": len(segments), "first_seq": segments[0].first_seq,
                                 "last_seq": segments[-1].last_seq} if segments else None})
        return 0
    rows = []
    for e in entries:
        if e.summary is not None:
            rows.append((e.seq, e.time[:19] + "Z", e.device_serial, e.device_type, e.tier.value, "no", "-", "-",
                         _summary_text(e)))
            continue
        c = e.claims or {}
        firmware = f"{c['swname']} {c['swversion']}" if c else "-"
        rows.append((e.seq, e.time[:19] + "Z", e.device_serial, e.device_type, e.tier.value,
                     "yes" if e.acceptable else "no", e.nonce or "-", firmware, ", ".join(e.codes) or "-"))
    output.table(["seq", "time", "device", "type", "verdict", "accepted", "nonce", "firmware", "reasons"], rows)
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} shown")
    if pending:
        n = sum(t.suppressed for t in pending.values())
        print(f"note: {n} more refused evidence message(s) from {len(pending)} device(s) are counted but not yet "
              "summarised (a summary entry comes before the device's next entry, or with the next rotation)")
    if segments:
        print(f"note: entries {segments[0].first_seq}..{segments[-1].last_seq} were rotated into "
              f"{len(segments)} sealed segment(s); this command reads only the registry "
              "('devid attest verify-log' checks the segments)")
    return 0


def _trusted(data: DataDir, store: AttestationStore):
    """The certificates that may seal segments: the gateway's, as the registry and DATA/ca have
    them, and only those issued by this data directory's operational CA (the registry may also
    hold rows of a CA an interrupted `devid init` made and never put in place)."""
    ders = store.gateway_certificates()
    if data.cert_path("gateway").exists():
        ders.append(data.cert("gateway").public_bytes(serialization.Encoding.DER))
    issuer = data.cert("operational")

    def ours(der: bytes) -> bool:
        try:
            x509.load_der_x509_certificate(der).verify_directly_issued_by(issuer)
            return True
        except (ValueError, TypeError, InvalidSignature):
            return False
    keys = {hashlib.sha256(d).digest(): d for d in ders if ours(d)}

    def trusted(der: bytes):
        known = keys.get(hashlib.sha256(der).digest())
        return x509.load_der_x509_certificate(known).public_key() if known is not None else None
    return trusted


def _verdict_window(data: DataDir) -> tuple[timedelta, str]:
    path = policy_path(data)
    if not path.exists():
        return MAX_VERDICT_WINDOW, f"no {path.name}: keeping the longest verdict window a policy may set"
    return load_policy(path).verdict_window, f"verdict window of {path.name}"


def _registry_json(kept):
    return None if kept is None else {"first_seq": kept[0], "last_seq": kept[1], "entries": kept[2]}


def cmd_rotate(args) -> int:
    data = DataDir(resolve_data_dir(args.data)).require()
    store = AttestationStore(data.open_registry())
    window, why = _verdict_window(data)
    now = datetime.now(timezone.utc)
    before = args.before if args.before is not None else now
    directory = Path(args.out) if args.out else data.path / SEGMENT_DIR
    signer = data.issuer("gateway")
    progress = output.Progress("rotating") if not args.json else None
    try:
        report = rotate(store, directory, signer, _trusted(data, store), before=before, now=now,
                        verdict_window=window, lock=data.path / LOCK_FILE, segment_entries=args.segment_entries,
                        progress=progress)
    except OSError as exc:
        raise LogError(f"{exc.filename or directory}: {exc.strerror}") from None
    if args.json:
        output.emit({
            "ok": True, "before": report.before.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "directory": str(directory),
            "segments": [{"file": a.file_name, "first_seq": a.first_seq, "last_seq": a.last_seq, "entries": a.entries,
                          "head_hash": a.head_hash.hex(), "sha256": a.file_sha256} for a in report.segments],
            "summaries": report.summaries, "recovered": report.recovered,
            "removed_temporary": report.removed_temporary,
            "ignored": [{"file": f, "reason": r} for f, r in report.ignored], "registry": _registry_json(report.kept)})
        return 0
    for name in report.removed_temporary:
        print(f"removed {name}: left by a rotation that stopped while writing it")
    for name in report.recovered:
        print(f"recovered {name}: sealed by a rotation that stopped before recording it; now recorded")
    for name, reason in report.ignored:
        print(f"warning: left {name} alone: {reason}")
    if report.summaries:
        print(f"wrote {report.summaries} summary entr{'y' if report.summaries == 1 else 'ies'} for refused evidence "
              "counted since the last one")
    for a in report.segments:
        print(f"sealed {a.file_name}: entries {a.first_seq}..{a.last_seq} ({a.entries}), SHA-256 {a.file_sha256}")
    when = report.before.strftime("%Y-%m-%dT%H:%M:%SZ")
    kept = (f"the registry keeps entries {report.kept[0]}..{report.kept[1]} ({report.kept[2]})" if report.kept
            else "the registry keeps no entries")
    if report.segments:
        moved = sum(a.entries for a in report.segments)
        print(f"OK: rotated {moved} entries older than {when} into {len(report.segments)} segment(s) in "
              f"{directory}; {kept}")
    else:
        print(f"OK: nothing to rotate: no entry older than {when} ({why}); {kept}")
    return 0


def cmd_verify_log(args) -> int:
    data = DataDir(resolve_data_dir(args.data)).require()
    store = AttestationStore(data.open_registry(readonly=True))
    directories = [Path(d) for d in args.segments] if args.segments else [data.path / SEGMENT_DIR]
    for d in directories:
        if args.segments and not d.is_dir():
            raise LogError(f"{d}: not a directory")
    progress = output.Progress("verifying") if not args.json else None
    try:
        with store.registry.snapshot():     # anchors and entries from one state, whatever rotates meanwhile
            report = verify_log(store, directories, _trusted(data, store), head=args.head,
                                require_present=args.require_segments, progress=progress)
    except OSError as exc:
        raise LogError(f"{exc.filename or directories[0]}: {exc.strerror}") from None
    problems = report.problems
    failed = f"attestation log verification failed: {len(problems)} problem(s)" if problems else None
    if args.json:
        if failed:
            raise output.CommandFailed(failed, {k: v for k, v in report.as_json().items() if k != "ok"})
        output.emit(report.as_json())
    else:
        for seg in report.segments:
            span = f"entries {seg.first_seq}..{seg.last_seq} ({seg.entries})"
            if seg.status == ARCHIVED:
                print(f"segment {seg.file}: {span}: archived, not present (continuity checked through its anchor)")
            elif seg.status != PENDING:
                print(f"segment {seg.file}: {span}: {seg.status}")
        for note in report.notes:
            print(f"note: {note}")
        for _, message in problems:
            print(f"BROKEN: {message}")
        if not problems:
            print(f"OK: {report.entries} entries, chain intact; head {report.head_seq}:{report.head_hash.hex()}")
    if failed:
        raise LogError(failed)
    return 0


def cmd_policy_check(args) -> int:
    path = Path(args.file) if args.file else policy_path(DataDir(resolve_data_dir(args.data)))
    policy = load_policy(path)
    if args.json:
        output.emit({"ok": True, "file": str(path), "device_types": {
            name: {"attestation": t.attestation, "accept": t.accept.value,
                   "revoke_on_contraindicated": t.revoke_on_contraindicated,
                   "secure_boot_required": t.secure_boot_required,
                   "debug_disabled_required": t.debug_disabled_required,
                   "minimum_firmware_version": t.minimum_firmware_version,
                   "firmware": [{"name": f.name, "version": f.version, "digest": f.key, "deprecated": f.deprecated}
                                for f in t.firmware]}
            for name, t in policy.device_types.items()}})
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

    s = atsub.add_parser("log", parents=[common],
                         help="show attestation decisions in the registry, oldest first; 'log rotate' seals old ones")
    s.add_argument("--device", metavar="SERIAL", help="only this device")
    s.add_argument("--verdict", choices=[t.value for t in Tier], help="only this verdict tier")
    s.add_argument("--since", type=parse_since, metavar="TIME",
                   help="only at or after TIME: 2026-11-28, 2026-11-28T12:00:00Z, or 90s / 15m / 2h / 7d ago")
    s.add_argument("--limit", type=output.positive_int, metavar="N", help="only the newest N matching entries")
    s.add_argument("--json", action="store_true", help="one JSON document: the entries, with claims and evidence")
    s.set_defaults(func=cmd_log)
    logsub = s.add_subparsers(dest="log_command", metavar="ACTION", required=False, parser_class=type(s))
    r = logsub.add_parser("rotate", parents=[common],
                          help="move old entries out of the registry into sealed, signed segment files")
    r.add_argument("--before", type=parse_since, metavar="TIME",
                   help="only entries older than TIME (2026-11-28, ..., or 90s / 15m / 2h / 7d ago); never an entry "
                        "inside the policy's verdict window (default: everything older than that window)")
    r.add_argument("--out", metavar="DIR", help=f"segment directory (default: DATA/{SEGMENT_DIR})")
    r.add_argument("--segment-entries", type=output.positive_int, default=DEFAULT_SEGMENT_ENTRIES, metavar="N",
                   help=f"at most N entries per segment file (default {DEFAULT_SEGMENT_ENTRIES})")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_rotate)

    s = atsub.add_parser("verify-log", parents=[common],
                         help="check the log's hash chain through its sealed segments and the registry; "
                              "exit 1 if anything was changed")
    s.add_argument("--head", type=_head, metavar="SEQ:HASH",
                   help="a head printed by an earlier verify-log: also check it is still in the log")
    s.add_argument("--segments", action="append", metavar="DIR",
                   help=f"look for segment files here instead of DATA/{SEGMENT_DIR} (repeatable: e.g. an archive)")
    s.add_argument("--require-segments", action="store_true",
                   help="fail if a recorded segment file is not present (default: reported as archived)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify_log)

    pol = atsub.add_parser("policy", parents=[common], help="the verification policy file")
    polsub = pol.add_subparsers(dest="policy_command", metavar="ACTION", required=True, parser_class=type(pol))
    s = polsub.add_parser("check", parents=[common], help="validate a policy file and summarise it")
    s.add_argument("file", nargs="?", metavar="FILE", help=f"policy file (default: DATA/{POLICY_FILE})")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_policy_check)


