"""Issue 12, items 12, 13, 14 and 17 (re-revoking), against the real CLI: organisation names kept
exactly (TOML and certificates), a failed init that leaves nothing behind, certificate serials
printed as openssl prints them, `devices show` by certificate serial or fingerprint, one meaning
of --data before and after every command, and an idempotent revoke that says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from devid.ca.authority import CertificateAuthority
from devid.gateway.app.datadir import DataDir
from devid.gateway.cli.dispatch import build_parser

from .conftest import NOW, make_csr, ok, one_line_error, register_device, run_devid, tool

CA_CERTS = ("root", "manufacturing", "operational", "gateway")


def _openssl(*args, input=None) -> str:
    proc = subprocess.run([tool("openssl"), *map(str, args)], capture_output=True, input=input, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().strip()


def _organizations(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]


# -- item 12: --org exactly as given ------------------------------------------------------------------

@pytest.mark.parametrize("org, rfc2253", [
    ('Bob\'s "Best" Devices', 'O=Bob\'s \\"Best\\" Devices'),
    ("C:\\Temp Org", "O=C:\\\\Temp Org"),           # RFC 2253 escapes the one backslash once
    ("Zürich, Ünits + Co; <x>", "O=Zürich\\, Ünits \\+ Co\\; \\<x\\>"),
])
def test_init_keeps_the_organisation_exactly(tmp_path, org, rfc2253):
    d = tmp_path / "data"
    doc = json.loads(ok(run_devid("init", "--org", org, "--json", data_dir=d)))
    assert doc["ok"] is True and doc["organization"] == org
    # devid.toml is valid TOML holding exactly that name, and every command reads it back
    assert tomllib.loads((d / "devid.toml").read_text())["organization"]["name"] == org
    assert DataDir(d).require().config.identity.organization == org
    for name in CA_CERTS:
        pem = d / "ca" / f"{name}.cert.pem"
        assert _organizations(pem) == [org], name                 # cryptography: the value itself
        # (RFC2253 also escapes each non-ASCII octet, \C3\BC; -esc_msb keeps them as UTF-8)
        subject = _openssl("x509", "-in", pem, "-noout", "-subject", "-nameopt",
                           "RFC2253" if org.isascii() else "RFC2253,-esc_msb")
        assert subject.endswith("," + rfc2253), subject             # openssl: escaped once, not doubled
        raw = _openssl("x509", "-in", pem, "-noout", "-subject", "-nameopt", "utf8,sep_comma_plus")
        assert raw.startswith(f"subject=O={org},CN="), raw          # unescaped: the name as given
    # and the device certificates issued later
    ok(run_devid("provision", "--count", "1", "--device-type", "t", "--out", tmp_path / "f", "--quiet", data_dir=d))
    assert _organizations(tmp_path / "f" / "SN00000001" / "cert.pem") == [org]


@pytest.mark.parametrize("args, needle", [
    (["--org", "x" * 65], "at most 64 characters"),
    (["--org", "line\nbreak"], "control characters"),
    (["--org", ""], "non-empty"),
    (["--org", " padded"], "blanks"),
    (["--passphrase-file", "DATA/pass"], "outside the data directory"),
    (["--passphrase-file", "LOOSE"], "chmod 600"),
    (["--passphrase-file", "EMPTY"], "empty passphrase file"),
    (["--passphrase-file", "NODIR/pass"], "No such file or directory"),
    (["--hostname", "bad name!"], "invalid host name"),
    (["--hostname", "bücher.example"], "xn--"),
])
@pytest.mark.parametrize("existed", [False, True], ids=["new-dir", "empty-dir"])
def test_a_failed_init_leaves_nothing_behind(tmp_path, args, needle, existed):
    d = tmp_path / "data"
    if existed:
        d.mkdir()
    loose, empty = tmp_path / "loose", tmp_path / "empty"
    loose.write_text("pw\n")
    loose.chmod(0o644)
    empty.write_text("")
    empty.chmod(0o600)
    subst = {"DATA/pass": d / "pass", "LOOSE": loose, "EMPTY": empty, "NODIR/pass": tmp_path / "nodir" / "pass"}
    one_line_error(run_devid("init", *[subst.get(a, a) for a in args], data_dir=d), needle)
    assert (sorted(p.name for p in d.iterdir()) == []) if existed else not d.exists()
    assert not (tmp_path / "nodir").exists() and empty.read_text() == ""
    # the next init does not trip over anything: it makes exactly what it is asked for
    ok(run_devid("init", "--org", "Second Try Ltd", data_dir=d))
    assert all(_organizations(d / "ca" / f"{n}.cert.pem") == ["Second Try Ltd"] for n in CA_CERTS)
    assert tomllib.loads((d / "devid.toml").read_text())["organization"]["name"] == "Second Try Ltd"


# an init whose last step (renaming the new ca/ into place) fails or is killed: devid.toml and the
# registry are written by then; os.rename stands in for the file system's refusal or the kill
_LAST_STEP = """
import os, signal, sys
import devid.gateway.app.datadir as datadir
import devid.gateway.cli.dispatch as cli
real = os.rename
def rename(src, dst):
    if str(src).rsplit("/", 1)[-1].startswith(".ca-init-"):
        if {kill!r}:
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(28, "No space left on device")
    return real(src, dst)
datadir.os.rename = rename
sys.exit(cli.main(["init", "--org", "First Attempt"]))
"""


def _interrupted_init(d: Path, kill: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    return subprocess.run([sys.executable, "-c", _LAST_STEP.format(kill=kill)], capture_output=True, timeout=120,
                          env={**env, "DEVID_DATA": str(d)})


def test_an_init_failing_at_its_last_step_removes_what_it_wrote(tmp_path):
    d = tmp_path / "data"
    proc = _interrupted_init(d, kill=False)
    one_line_error(proc)
    assert not d.exists()
    ok(run_devid("init", "--org", "Second Attempt", data_dir=d))
    assert _organizations(d / "ca" / "root.cert.pem") == ["Second Attempt"]


def test_an_init_killed_at_its_last_step_is_taken_over_by_the_next(tmp_path):
    d = tmp_path / "data"
    proc = _interrupted_init(d, kill=True)
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in d.iterdir())
    assert "devid.toml" in left and "ca" not in left and any(n.startswith(".ca-init-") for n in left), left
    assert "First Attempt" in (d / "devid.toml").read_text()
    one_line_error(run_devid("devices", "list", data_dir=d), "no CA", "devid init")
    # the leftover devid.toml is recognised as the killed init's, not an operator's: replaced
    ok(run_devid("init", "--org", "Second Attempt", data_dir=d))
    assert tomllib.loads((d / "devid.toml").read_text())["organization"]["name"] == "Second Attempt"
    assert all(_organizations(d / "ca" / f"{n}.cert.pem") == ["Second Attempt"] for n in CA_CERTS)
    assert not list(d.glob(".ca-init-*")) and not (d / "ca" / "devid.toml.sha256").exists()
    ok(run_devid("provision", "--count", "1", "--device-type", "t", "--out", tmp_path / "f", "--quiet", data_dir=d))


def test_a_broken_devid_toml_left_by_an_older_init_is_replaced(tmp_path):
    """What an older devid's failed `init --org 'Bob's "Best" Devices'` left: its devid.toml, not
    TOML. It carries init's header and there is no CA: the next init replaces it. A broken file
    without that header is someone's: refused, and kept."""
    d = tmp_path / "data"
    d.mkdir()
    old = ('# devid configuration, written by `devid init`. Names and OIDs here end up in every certificate.\n\n'
           '[organization]\nname = "Bob\'s "Best" Devices"\npen = 12345\n')
    (d / "devid.toml").write_text(old)
    ok(run_devid("init", "--org", 'Bob\'s "Best" Devices', data_dir=d))
    assert _organizations(d / "ca" / "root.cert.pem") == ['Bob\'s "Best" Devices']
    e = tmp_path / "other"
    e.mkdir()
    (e / "devid.toml").write_text('[organization]\nname = "unterminated\n')
    one_line_error(run_devid("init", data_dir=e), "not valid TOML")
    assert (e / "devid.toml").read_text() == '[organization]\nname = "unterminated\n' and not (e / "ca").exists()


def test_an_operators_devid_toml_is_kept_and_must_agree_with_org(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "devid.toml").write_text('[organization]\nname = "Operator \\"Q\\" Ltd"\npen = 4242\n')
    one_line_error(run_devid("init", "--org", "Someone Else", data_dir=d), "organization.name", "leave out --org")
    assert (d / "devid.toml").exists() and not (d / "ca").exists()
    ok(run_devid("init", "--org", 'Operator "Q" Ltd', data_dir=d))
    assert "pen = 4242" in (d / "devid.toml").read_text()
    assert _organizations(d / "ca" / "root.cert.pem") == ['Operator "Q" Ltd']
    # an operator's file with a name no certificate may carry is refused, and kept
    e = tmp_path / "other"
    e.mkdir()
    (e / "devid.toml").write_text(f'[organization]\nname = "{"y" * 70}"\n')
    one_line_error(run_devid("init", data_dir=e), "organization.name", "at most 64")
    assert sorted(p.name for p in e.iterdir()) == ["devid.toml"]


# -- item 13: serials as openssl prints them; devices show by certificate ---------------------------------

def _openssl_serial(pem: bytes) -> str:
    return _openssl("x509", "-noout", "-serial", input=pem).removeprefix("serial=")


def _openssl_fingerprint(pem: bytes) -> str:
    return _openssl("x509", "-noout", "-fingerprint", "-sha256", input=pem).split("=", 1)[1]


@pytest.fixture
def issued(data, ca, registry):
    """Device SN1 with operational certificates whose serials openssl prints with a leading 0 (an
    odd number of hex digits), whose DER integer needs a 00 octet (its first octet's top bit set),
    and an ordinary one (the CA's randomness is ours here; serials are its first 127 bits)."""
    register_device(ca, "SN1")
    certs = []
    for first in (0x05, 0x01, 0x5A):
        fixed = CertificateAuthority(ca._issuers, ca.profiles, ca.settings, registry,
                                     rand_bytes=lambda n, first=first: bytes([first]) + os.urandom(n - 1))
        certs.append(fixed.issue_operational(make_csr()[0], "SN1", NOW))
    return data.path, certs


def test_serials_print_as_openssl_prints_them(issued, tmp_path):
    ddir, certs = issued
    expected = [_openssl_serial(c.pem) for c in certs]
    assert any(len(s) % 2 == 0 and s.startswith("0") for s in expected)
    assert all(s == s.upper() and len(s) % 2 == 0 for s in expected)
    shown = json.loads(ok(run_devid("devices", "show", "SN1", "--json", data_dir=ddir)))
    operational = [c["serial"] for c in shown["certificates"] if c["profile"] == "operational"]
    assert operational == expected
    factory = [c for c in shown["certificates"] if c["profile"] == "factory"]
    text = ok(run_devid("devices", "show", "SN1", data_dir=ddir))
    assert all(s in text for s in expected)
    # ca sign-csr (stderr line and JSON), ca verify (text and JSON), ca cert and init (JSON)
    (tmp_path / "op.csr").write_bytes(make_csr()[0])
    proc = run_devid("ca", "sign-csr", "--profile", "operational", "--device", "SN1", "--csr", tmp_path / "op.csr",
                     "--out", tmp_path / "op.pem", data_dir=ddir)
    new = _openssl_serial((tmp_path / "op.pem").read_bytes())
    assert proc.returncode == 0 and f"certificate {new} for device SN1" in proc.stderr.decode()
    doc = json.loads(ok(run_devid("ca", "sign-csr", "--profile", "operational", "--device", "SN1", "--csr",
                                  tmp_path / "op.csr", "--json", data_dir=ddir)))
    assert doc["certificate"]["serial"] == _openssl_serial(doc["pem"].encode())
    assert doc["certificate"]["sha256_fingerprint"] == _openssl_fingerprint(doc["pem"].encode()).replace(":", "").lower()
    (tmp_path / "last.pem").write_text(doc["pem"])
    latest = _openssl_serial(doc["pem"].encode())
    assert f"certificate {latest}" in ok(run_devid("ca", "verify", tmp_path / "last.pem", "--profile", "operational",
                                                   data_dir=ddir))
    assert json.loads(ok(run_devid("ca", "verify", tmp_path / "last.pem", "--profile", "operational", "--json",
                                   data_dir=ddir)))["certificate_serial"] == latest
    for name in CA_CERTS:
        doc = json.loads(ok(run_devid("ca", "cert", name, "--json", data_dir=ddir)))
        assert doc["serial"] == _openssl_serial(doc["pem"].encode())
    # revoke: the certificates it revoked, in text and JSON
    doc = json.loads(ok(run_devid("revoke", "--certificate", expected[0].lower(), "--json", data_dir=ddir)))
    assert doc["certificate"]["serial"] == expected[0]
    text = ok(run_devid("revoke", "SN1", data_dir=ddir))
    assert factory[0]["serial"] in text and expected[1] in text and expected[0] not in text


def test_devices_show_finds_a_device_by_certificate_serial_or_fingerprint(issued):
    ddir, certs = issued
    cert = certs[0]
    serial, fp = _openssl_serial(cert.pem), _openssl_fingerprint(cert.pem)
    colons = ":".join(serial[i:i + 2] for i in range(0, len(serial), 2))
    for ref in (serial, serial.lower(), colons, colons.lower(), serial.lstrip("0"),
                fp, fp.replace(":", ""), fp.lower(), f"sha256 Fingerprint={fp}"):
        doc = json.loads(ok(run_devid("devices", "show", ref, "--json", data_dir=ddir)))
        assert doc["serial"] == "SN1" and doc["found_by_certificate"] == serial, ref
    text = ok(run_devid("devices", "show", fp, data_dir=ddir))
    assert text.startswith("serial               SN1") and f"found by certificate {serial}" in text
    # by its own serial: no "found by"
    assert "found_by_certificate" not in json.loads(ok(run_devid("devices", "show", "SN1", "--json", data_dir=ddir)))
    root = _openssl_serial((ddir / "ca" / "root.cert.pem").read_bytes())
    one_line_error(run_devid("devices", "show", root, data_dir=ddir), f"certificate {root} is a ca certificate",
                   "not a device's")
    one_line_error(run_devid("devices", "show", "NOSUCH1", data_dir=ddir), "unknown device 'NOSUCH1'")
    one_line_error(run_devid("devices", "show", "ab" * 32, data_dir=ddir), "unknown device")


# -- item 14: --data, one meaning, before or after every command ------------------------------------------

def _data_commands() -> list[tuple[str, ...]]:
    """Every command (leaf of the parser) that uses the data directory."""
    from devid.gateway.cli.device import is_device_path
    def leaves(parser, prefix=()):
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            yield prefix
        for action in subs:
            for name, sub in action.choices.items():
                yield from leaves(sub, (*prefix, name))
    out = []
    for path in leaves(build_parser()):
        if not is_device_path(path) and path[0] != "bench":
            out.append(path)
    if ("attest", "log") not in out:
        out.append(("attest", "log"))           # a command that also has a subcommand (rotate)
    return sorted(out)


# the least each command needs to get as far as its data directory
_ARGS = {("ca", "cert"): ["root"], ("ca", "sign-csr"): ["--profile", "operational", "--device", "SN1", "--csr", "CSR"],
         ("ca", "verify"): ["CERT"], ("revoke",): ["SN1"], ("devices", "show"): ["SN1"],
         ("provision",): ["--count", "1", "--device-type", "t", "--out", "OUT"], ("serve",): ["--listen", "127.0.0.1:0"],
         ("registry", "migrate"): ["--to", "postgresql://devid@127.0.0.1:1/devid"],
         ("mqtt", "broker-config"): ["--out", "OUT"], ("operator", "cert"): ["--out", "OUT", "--name", "x"]}


def test_every_data_command_takes_data_before_and_after(tmp_path):
    nowhere = tmp_path / "afile" / "data"           # a path no command can use: its parent is a file
    (tmp_path / "afile").write_text("")
    (tmp_path / "c.pem").write_bytes(b"x")
    (tmp_path / "c.csr").write_bytes(make_csr()[0])
    subst = {"CSR": tmp_path / "c.csr", "CERT": tmp_path / "c.pem", "OUT": tmp_path / "out"}
    commands = _data_commands()
    assert {("init",), ("demo",), ("serve",), ("attest", "policy", "check"), ("attest", "log", "rotate")} <= set(commands)
    for path in commands:
        rest = [str(subst.get(a, a)) for a in _ARGS.get(path, [])]
        elsewhere = tmp_path / "elsewhere"              # $DEVID_DATA, which --data overrides
        for argv in (["--data", str(nowhere), *path, *rest], [*path, *rest, "--data", str(nowhere)],
                     [*path, *rest, f"--data={nowhere}"]):
            proc = run_devid(*argv, data_dir=elsewhere)
            err = one_line_error(proc, str(nowhere))
            assert proc.returncode == 1 and str(elsewhere) not in err, (argv, err)
        assert not elsewhere.exists()


def test_init_with_data_before_or_after(tmp_path):
    ok(run_devid("--data", tmp_path / "a", "init"))
    ok(run_devid("init", "--data", tmp_path / "b"))
    assert (tmp_path / "a" / "ca" / "root.cert.pem").exists() and (tmp_path / "b" / "ca" / "root.cert.pem").exists()
    assert "SN" not in ok(run_devid("--data", tmp_path / "a", "devices", "list", "--data", tmp_path / "b"))


@pytest.mark.parametrize("command", ["enroll", "renew", "fetch-config", "simulate"])
def test_device_commands_refuse_data(tmp_path, command):
    rest = ["--gateway", "coaps://127.0.0.1:1", "--devices" if command == "simulate" else "--device", str(tmp_path)]
    proc = one_line_error(run_devid("--data", tmp_path, command, *rest), "uses no data directory")
    assert "see 'devid --help'" in proc
    one_line_error(run_devid(command, *rest, "--data", tmp_path), "unrecognized arguments: --data")


def test_bench_data_means_the_data_directory_of_the_gateway_under_test(tmp_path):
    for argv in (["--data", tmp_path, "bench"], ["bench", "--data", tmp_path]):
        proc = run_devid(*argv, "--devices", "1")
        assert proc.returncode == 2
        one_line_error(proc, "--data names the data directory of the gateway under test", "--workdir")
    nowhere = tmp_path / "nowhere"
    for argv in (["--data", nowhere, "bench"], ["bench", "--data", nowhere]):
        one_line_error(run_devid(*argv, "--gateway", "coaps://127.0.0.1:1", "--devices", "1"),
                       f"data directory {nowhere} does not exist")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    one_line_error(run_devid("bench", "--workdir", tmp_path / "full"), "--workdir", "empty directory")


# -- item 17 (first half): revoking twice --------------------------------------------------------------

def test_revoking_twice_says_it_already_was(issued):
    ddir, certs = issued
    serial = _openssl_serial(certs[2].pem)
    text = ok(run_devid("revoke", "--certificate", serial, "--reason", "keyCompromise", data_dir=ddir))
    assert f"certificate {serial} (operational, device SN1) revoked (keyCompromise)" in text
    again = run_devid("revoke", "--certificate", serial, "--reason", "superseded", data_dir=ddir)
    assert again.returncode == 0
    assert "was already revoked on" in again.stdout.decode() and "(keyCompromise); nothing changed" in \
        again.stdout.decode()
    doc = json.loads(ok(run_devid("revoke", "--certificate", serial, "--json", data_dir=ddir)))
    assert doc["already_revoked"] is True and doc["revocation_reason"] == "keyCompromise"

    first = json.loads(ok(run_devid("revoke", "SN1", "--reason", "cessationOfOperation", "--json", data_dir=ddir)))
    assert first["already_revoked"] is False and first["state"] == "revoked"
    assert len(first["newly_revoked"]) == 3           # the factory and the two operational not yet revoked
    text = ok(run_devid("revoke", "SN1", "--reason", "keyCompromise", data_dir=ddir))
    assert text.startswith("device SN1 was already revoked on ") and \
        text.rstrip().endswith("(cessationOfOperation); nothing changed")
    assert "run 'devid crl'" not in text
    doc = json.loads(ok(run_devid("revoke", "SN1", "--json", data_dir=ddir)))
    assert doc["already_revoked"] is True and doc["newly_revoked"] == [] and \
        doc["revocation_reason"] == "cessationOfOperation" and doc["revoked_at"] == first["revoked_at"]
    # an unknown device is still an error
    one_line_error(run_devid("revoke", "NOSUCH1", data_dir=ddir), "unknown device")


# -- item 18: devid bench shows its progress on stderr ----------------------------------------------------

_SMALL_BENCH = ("bench", "--devices", "3", "--concurrency", "1", "--clients", "1", "--workers", "1", "--no-baselines")


def test_bench_shows_progress_on_stderr_unless_quiet(tmp_path):
    work = tmp_path / "work"
    proc = run_devid(*_SMALL_BENCH, "--workdir", work)
    doc = json.loads(ok(proc))
    assert doc["ok"] is True and doc["enroll"]["done"] == 3
    lines = proc.stderr.decode().splitlines()
    assert lines and all(line.startswith("devid bench: ") for line in lines), lines
    text = "\n".join(lines)
    # 3 devices, and the write probe's 10 (issue 13: --probe-devices)
    for stage in (f"creating a CA in {work / 'data'}", f"provisioning 13 devices into {work / 'factory'}",
                  "starting devid serve --workers 1 on 127.0.0.1:",
                  "write probe: enroll: 10 devices, 1 in flight from 1 lean client", "write probe: enroll: 10/10 done in",
                  "enroll: 3 devices, 1 in flight from 1 lean client", "enroll: 3/3 done in",
                  "summary: enroll ", "per enrollment: ", f"kept {work}"):
        assert stage in text, (stage, text)
    assert (work / "data" / "ca" / "root.cert.pem").exists() and len(list((work / "factory").iterdir())) == 13
    for quiet in ("--quiet", "--json"):
        proc = run_devid(*_SMALL_BENCH, quiet)
        assert json.loads(ok(proc))["ok"] is True and proc.stderr == b"", proc.stderr.decode()


def test_bench_draws_a_progress_bar_on_a_terminal(tmp_path):
    import pty
    main, terminal = pty.openpty()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEVID_")}
        proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", *_SMALL_BENCH], stdout=subprocess.PIPE,
                              stderr=terminal, env=env, timeout=300)
        os.close(terminal)
        terminal = None
        shown = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:            # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if terminal is not None:
            os.close(terminal)
        os.close(main)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True
    text = shown.decode()
    assert "\rdevid bench: provisioning [" in text and "] 3/3 " in text, text     # how far, as it goes
    assert "devid bench: enroll: 3/3 done" in text
