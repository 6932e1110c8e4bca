"""`devid registry ...`: moving the registry to PostgreSQL, and checking its invariants.

    devid registry migrate --to postgresql://USER@HOST:PORT/DB [--registry-password-file FILE] [--switch] [--json]
    devid registry check [--segments DIR]... [--json]

`migrate` copies the data directory's SQLite registry (DATA/registry.sqlite3, left as it was)
into an empty PostgreSQL registry in one transaction, verifies the copy before it commits
(gateway/store/registry_copy.py), and with `--switch` names the new registry in devid.toml.
`check` runs the invariants of gateway/store/registry_check.py on the registry this data
directory uses (either engine). docs/cli.md#devid-registry.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from devid.ca import keys
from devid.ca.identity import fingerprint

from devid.gateway.app.datadir import CERT_NAMES, ENV_REGISTRY, DataDir, resolve_data_dir
from devid.gateway.app.settings import Config, check_registry_url
from devid.gateway.cli import output
from devid.gateway.cli.attest import _trusted
from devid.gateway.errors import CLIError, ConfigError, DirectoryBusy, RegistryError
from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.store.engines import is_postgres_url, open_registry, redact
from devid.gateway.store.log_rotation import SEGMENT_DIR
from devid.gateway.store.log_verify import verify_log
from devid.gateway.store.registry_check import check_registry
from devid.gateway.store.registry_copy import CopyMismatch, copy_registry, sqlite_holder
from devid.gateway.system.fs import directory_lock, write_atomic


def _password(path: Path | None) -> str | None:
    if path is None:
        return None
    keys.check_private_file(path)
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--registry-password-file {path}: {exc.strerror}") from None


def _switched_config(data: DataDir, url: str, password_file: Path | None) -> bytes:
    """devid.toml with a [registry] section naming `url` added at its end (the operator's text and
    comments kept); checked as devid.toml before anything is copied. No password is ever in it."""
    try:
        check_registry_url(url)
    except ValueError as exc:
        raise CLIError(f"--switch: --to {redact(url)} {exc}") from None
    try:
        text = data.config_path.read_text() if data.config_path.exists() else ""
    except OSError as exc:
        raise ConfigError(f"{data.config_path}: {exc.strerror}") from None
    try:
        if "registry" in tomllib.loads(text):
            raise ConfigError(f"{data.config_path} already has a [registry] section: remove it, or edit it yourself "
                              "after migrating without --switch")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{data.config_path}: not valid TOML: {exc}") from None
    import tomli_w
    section = {"url": url, **({"password_file": str(password_file.absolute())} if password_file else {})}
    added = ("[registry]\n# the shared registry of every gateway host (docs/scale-out.md), moved here from "
             "registry.sqlite3 by 'devid registry migrate'; no password here\n" + tomli_w.dumps(section))
    new = text + ("" if not text or text.endswith("\n") else "\n") + ("\n" if text else "") + added
    Config.parse(new, str(data.config_path))
    return new.encode()


def cmd_migrate(args) -> int:
    data = DataDir(resolve_data_dir(args.data)).require()
    url = args.to
    if not is_postgres_url(url):
        raise CLIError("--to: not a PostgreSQL URL (postgresql://USER@HOST:PORT/DATABASE)")
    if data.config.registry_url:
        raise ConfigError(f"{data.config_path} already names a PostgreSQL registry "
                          f"({redact(data.config.registry_url)}): this data directory does not use its SQLite registry")
    source_path = data.db_path
    if not source_path.is_file():
        raise RegistryError(f"{source_path}: no SQLite registry to migrate")
    new_config = _switched_config(data, url, args.registry_password_file) if args.switch else None
    password = _password(args.registry_password_file)
    target_name = redact(url)
    try:
        with directory_lock(data.path):
            return _migrate_locked(args, data, source_path, url, target_name, password, new_config)
    except DirectoryBusy as exc:
        who = f"pid {exc.pid}" if exc.pid else "another process"
        raise RegistryError(f"another devid command ({who}) holds {data.path} (init, join or migrate): "
                            "wait for it to end; nothing was copied") from None


def _in_use(source_path: Path, when: str) -> None:
    pid = sqlite_holder(source_path)
    if pid is not None:
        who = f"process {pid}" if pid else "another process"
        raise RegistryError(f"{source_path} is open in {who} (a running 'devid serve'?): stop the gateway and every "
                            f"other devid command on this data directory, then migrate; {when}")


def _migrate_locked(args, data: DataDir, source_path: Path, url: str, target_name: str, password: str | None,
                    new_config: bytes | None) -> int:
    _in_use(source_path, "nothing was copied")
    source = open_registry(source_path, readonly=True)
    try:
        trusted = _trusted(data, AttestationStore(source))
        target = open_registry(url, create=True, password=password)
        try:
            log_report = None

            def before_commit() -> None:
                nonlocal log_report
                _in_use(source_path, "the copy was rolled back, nothing was written")
                log_report = verify_log(AttestationStore(target), [data.path / SEGMENT_DIR], trusted)
                if not log_report.ok:
                    raise CopyMismatch(f"the attestation log's chain does not verify in the copy "
                                       f"({log_report.problems[0][1]}): rolled back, nothing was written "
                                       "('devid attest verify-log' shows whether the SQLite registry's log is broken)")

            try:
                config_text = data.config_path.read_text()
            except OSError:
                config_text = ""
            deployment = {"root_fingerprint": fingerprint(data.cert("root")), "devid.toml": config_text}
            report = copy_registry(source, target, progress=None if args.json else _Progress(),
                                   before_commit=before_commit, deployment=deployment)
        finally:
            target.close()
    finally:
        source.close()
    if new_config is not None:
        write_atomic(data.config_path, new_config)
    log = {"entries": log_report.entries, "registry_entries": log_report.registry_entries,
           "head_seq": log_report.head_seq, "head_hash": log_report.head_hash.hex(),
           "segments": len(log_report.segments)}
    if args.json:
        output.emit({"ok": True, "from": str(source_path), "to": target_name, "rows": report.rows,
                     "tables": {t.table: t.as_json() for t in report.tables}, "log": log,
                     "deployment_recorded": report.deployment_recorded,
                     "switched": new_config is not None, "config": str(data.config_path) if new_config else None})
        return 0
    output.table(["table", "rows", "copy"], [(t.table, t.source_rows, "identical" if t.ok else "DIFFERENT")
                                             for t in report.tables])
    print(f"attestation log: {log['entries']} entries verified in the copy ({log['segments']} segment(s)); "
          f"head {log['head_seq']}:{log['head_hash']}")
    if report.deployment_recorded:
        print("recorded this data directory's root and devid.toml as the deployment (the SQLite registry, older "
              "than schema 7, had none): other hosts can join it with 'devid init --join'")
    print(f"OK: copied {report.rows} rows from {source_path} into {target_name}; {source_path.name} is left as it was")
    if new_config is not None:
        print(f"{data.config_path} now names {target_name}: every devid command and 'devid serve' on this data "
              "directory uses it from now on")
    else:
        print(f"this data directory still uses {source_path.name}: to switch, add [registry] url = \"{target_name}\" "
              f"to {data.config_path} (or run with --registry URL / ${ENV_REGISTRY})")
    return 0


class _Progress:
    """Rows copied per table of a big registry on stderr: a bar on a terminal (else a line every
    5 s) while a table of PROGRESS_BAR rows or more copies, one line when a table of
    PROGRESS_ROWS or more is done; a small registry copies in silence."""

    PROGRESS_ROWS = 1000
    PROGRESS_BAR = 20000

    def __init__(self) -> None:
        self.table: str | None = None
        self.bar: output.Progress | None = None

    def __call__(self, table: str, done: int, total: int) -> None:
        if table != self.table:
            self.table, self.bar = table, output.Progress(f"copying {table}")
        if total >= self.PROGRESS_BAR:
            self.bar(done, total)
        if done >= total and total >= self.PROGRESS_ROWS:
            print(f"copied {table}: {done} rows", file=sys.stderr, flush=True)


def cmd_check(args) -> int:
    data = DataDir(resolve_data_dir(args.data)).require()
    registry = data.open_registry(readonly=True)
    try:
        directories = [Path(d) for d in args.segments] if args.segments else [data.path / SEGMENT_DIR]
        for d in directories:
            if args.segments and not d.is_dir():
                raise CLIError(f"--segments {d}: not a directory")
        trusted = _trusted(data, AttestationStore(registry))
        certs = {name: data.cert(name) for name in CERT_NAMES if data.cert_path(name).exists()}
        progress = None if args.json else output.Progress("checking certificates")
        report = check_registry(registry, segment_dirs=directories, trusted=trusted, ca_certificates=certs,
                                progress=progress)
        engine = registry.engine
    finally:
        registry.close()
    doc = {"registry": data.registry_name, "engine": engine, "checks": [c.as_json() for c in report.checks]}
    failed = report.failed
    message = (f"registry check failed: {len(failed)} of {len(report.checks)} checks "
               f"({'; '.join(c.name for c in failed)})") if failed else None
    if args.json:
        if failed:
            raise output.CommandFailed(message, doc)
        output.emit({"ok": True, **doc})
        return 0
    print(f"registry {data.registry_name} ({engine})")
    output.table(["check", "result", "checked", "problems"],
                 [(c.name, "ok" if c.ok else "FAILED", c.checked, c.count) for c in report.checks])
    for c in report.checks:
        if c.note:
            print(f"note: {c.name}: {c.note}")
        for example in c.problems:
            print(f"FAILED: {c.name}: {example}")
        if c.count > len(c.problems):
            print(f"FAILED: {c.name}: ... and {c.count - len(c.problems)} more")
    if failed:
        raise output.CommandFailed(message)
    print(f"OK: all {len(report.checks)} checks passed")
    return 0


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    reg = sub.add_parser("registry", parents=[common], help="move the registry to PostgreSQL; check its invariants")
    regsub = reg.add_subparsers(dest="registry_command", metavar="ACTION", required=True, parser_class=type(reg))

    s = regsub.add_parser("migrate", parents=[common],
                          help="copy this data directory's SQLite registry into an empty PostgreSQL registry "
                               "(stop the gateway first; the SQLite file is left as it was)")
    s.add_argument("--to", required=True, metavar="URL",
                   help="the empty PostgreSQL registry, postgresql://USER@HOST:PORT/DATABASE")
    s.add_argument("--registry-password-file", metavar="FILE", type=Path,
                   help="the PostgreSQL password is in FILE (mode 0600); with --switch, devid.toml names FILE")
    s.add_argument("--switch", action="store_true",
                   help="after a verified copy, write [registry] url into devid.toml (the URL must hold no "
                        "password): this data directory then uses PostgreSQL")
    s.add_argument("--json", action="store_true", help="one JSON document: rows per table, the log's head")
    s.set_defaults(func=cmd_migrate)

    s = regsub.add_parser("check", parents=[common],
                          help="verify the registry's invariants (either engine); exit 1 if one fails")
    s.add_argument("--segments", action="append", metavar="DIR",
                   help=f"look for log segment files here instead of DATA/{SEGMENT_DIR} (repeatable)")
    s.add_argument("--json", action="store_true", help="one JSON document: every check with its counts")
    s.set_defaults(func=cmd_check)
