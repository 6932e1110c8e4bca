"""Issue 10, failures 6 and 9: a missing registry is an error, read-only commands work on a
read-only data directory, and bad input is one error line (never a traceback)."""

from __future__ import annotations

import contextlib
import json
import subprocess

import pytest

from .conftest import run_devid
from devid.gateway.app.datadir import Config, ConfigError


def _one_error_line(proc, *fragments: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("devid"), err
    for fragment in fragments:
        assert fragment in lines[0], err
    return lines[0]


@pytest.mark.sqlite_only       # the registry file in the data directory
@pytest.mark.parametrize("damage", ["removed", "emptied"])
def test_missing_or_empty_registry_is_an_error_naming_the_file(data, tmp_path, damage):
    run_devid("provision", "--count", "2", "--device-type", "t", "--out", tmp_path / "f1",
              "--serial-prefix", "CL", "--quiet", data_dir=data.path, check=True)
    for suffix in ("", "-wal", "-shm"):
        path = data.db_path.with_name(data.db_path.name + suffix)
        if damage == "removed" or suffix:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(b"")
    line = _one_error_line(run_devid("devices", "list", data_dir=data.path), str(data.db_path))
    assert ("missing" if damage == "removed" else "empty") in line
    # a writing command must not recreate it and re-issue CL00000001
    _one_error_line(run_devid("provision", "--count", "1", "--device-type", "t", "--out", tmp_path / "f2",
                              "--serial-prefix", "CL", "--quiet", data_dir=data.path), str(data.db_path))
    assert not (tmp_path / "f2" / "CL00000001").exists()
    if damage == "removed":
        assert not data.db_path.exists()
    else:
        assert data.db_path.stat().st_size == 0


@contextlib.contextmanager
def _read_only(path):
    """A read-only bind mount over `path` (root ignores file modes, not a read-only mount)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.sqlite_only       # the registry file in the data directory
def test_read_only_commands_work_on_a_read_only_data_dir(data, tmp_path):
    run_devid("provision", "--count", "3", "--device-type", "t", "--out", tmp_path / "f", "--quiet",
              data_dir=data.path, check=True)
    for suffix in ("-wal", "-shm"):      # as after a clean shutdown: no -shm for a reader to use
        assert not data.db_path.with_name(data.db_path.name + suffix).exists()
    with _read_only(data.path):
        listed = run_devid("devices", "list", "--json", data_dir=data.path)
        assert listed.returncode == 0, listed.stderr.decode()
        assert len(json.loads(listed.stdout)["devices"]) == 3
        shown = run_devid("devices", "show", "SN00000002", data_dir=data.path)
        assert shown.returncode == 0 and b"SN00000002" in shown.stdout, shown.stderr.decode()
        for command in (["attest", "log"], ["attest", "verify-log"]):
            proc = run_devid(*command, data_dir=data.path)
            assert proc.returncode == 0, proc.stderr.decode()
        # a command that writes says why it cannot, in one line
        _one_error_line(run_devid("provision", "--count", "1", "--device-type", "t", "--out",
                                  tmp_path / "g", "--quiet", data_dir=data.path))


@pytest.mark.parametrize("args, fragment", [
    (["devices", "list", "--limit", "-5"], "--limit"),
    (["devices", "list", "--limit", "0"], "--limit"),
    (["attest", "log", "--since", "99999999d"], "too far back"),
    (["enroll", "--gateway", "coaps://[::1", "--device", "."], "coaps://HOST"),
    (["enroll", "--gateway", "coaps://gw:99999", "--device", "."], "coaps://HOST"),
])
def test_bad_input_is_one_line(data, args, fragment):
    _one_error_line(run_devid(*args, data_dir=data.path), fragment)


def test_provision_out_is_a_file(data, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me\n")
    _one_error_line(run_devid("provision", "--count", "1", "--device-type", "t", "--out", target, "--quiet",
                              data_dir=data.path), str(target))
    assert target.read_text() == "keep me\n"


def test_provision_on_a_full_disk_is_one_line_and_registers_nothing_unwritten(data, tmp_path):
    out = tmp_path / "small"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(out)], check=True)
    try:
        proc = run_devid("provision", "--count", "200", "--device-type", "t", "--out", out, "--quiet",
                         "--workers", "1", data_dir=data.path)
        _one_error_line(proc, "No space left on device")
        bundles = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    finally:
        subprocess.run(["umount", str(out)], check=True)
    registry = data.open_registry(readonly=True)
    try:
        registered = {d.serial for d in registry.list_devices()}
    finally:
        registry.close()
    assert bundles <= registered                # every bundle written is a registered device
    assert len(registered) < 200


@pytest.mark.parametrize("toml, fragment", [
    ("[profiles]\nfactory_validity_days = 99999999999\n", "profiles.factory_validity_days"),
    ("[profiles]\noperational_validity_days = 0\n", "profiles.operational_validity_days"),
    ("[profiles]\noperational_validity_days = true\n", "profiles.operational_validity_days"),
    ("[profiles]\noperational_validity_days = \"90\"\n", "profiles.operational_validity_days"),
    ("[crl]\nvalidity_days = 1000\n", "crl.validity_days"),
    ("[organization]\npen = -1\n", "organization.pen"),
    ("[organization]\nname = \"\"\n", "organization.name"),
    ("[identity]\ndevice_type_oid = \"not an oid\"\n", "identity.device_type_oid"),
    ("[profiles]\noperational_validty_days = 30\n", "operational_validty_days"),
    ("[profile]\n", "[profile]"),
    ("profiles = 3\n", "[profiles]"),
    ("[profiles\n", "not valid TOML"),
    ("[budgets]\ncertificate_window = 1e300\n", "budgets.certificate_window"),
    ("[budgets]\ncertificate_window = inf\n", "budgets.certificate_window"),
    ("[budgets]\nsuperseded_grace = nan\n", "budgets.superseded_grace"),
    ("[budgets]\nsuperseded_grace = 7200\n", "budgets.superseded_grace"),
    ("[budgets]\nnonce = {interval = true}\n", "budgets.nonce.interval"),
    ("[budgets]\nrefusal_log_interval = true\n", "budgets.refusal_log_interval"),
    ("[attestation_log]\nwindow = 1e300\n", "attestation_log.window"),
    ("[attestation_log]\nwindow = 30\n", "attestation_log.window"),
    ("[attestation_log]\nrefused_per_window = 0\n", "attestation_log.refused_per_window"),
    ("[gateway]\nidle_timeout = nan\n", "gateway.idle_timeout"),
    ("[gateway]\nidle_timeout = 1" + "0" * 400 + "\n", "gateway.idle_timeout"),
    ("[gateway]\nhandshake_rate_per_address = 1" + "0" * 400 + "\n", "gateway.handshake_rate_per_address"),
    ("[budgets]\ncertificate_window = 1" + "0" * 400 + "\n", "budgets.certificate_window"),
    ("[budgets]\nrenew = {interval = 1" + "0" * 400 + "}\n", "budgets.renew"),
    ("[attestation_log]\nrefused_per_window = 1" + "0" * 400 + "\n", "attestation_log.refused_per_window"),
    ("[profiles]\noperational_validity_days = 1" + "0" * 400 + "\n", "profiles.operational_validity_days"),
])
def test_bad_devid_toml_values(toml, fragment):
    with pytest.raises(ConfigError) as info:
        Config.parse(toml, "devid.toml")
    assert fragment in str(info.value)
    assert str(info.value).startswith("devid.toml: ")


def test_bad_devid_toml_is_one_line_from_the_cli(data):
    data.config_path.write_text(data.config_path.read_text().replace("[crl]\nvalidity_days = 7",
                                                                     "[crl]\nvalidity_days = 99999999999"))
    for command in (["crl"], ["devices", "list"], ["attest", "log"], ["attest", "verify-log"]):
        _one_error_line(run_devid(*command, data_dir=data.path), "crl.validity_days", "devid.toml")


@pytest.mark.sqlite_only       # the defaults: on PostgreSQL devid.toml also names the registry
def test_devid_toml_as_written_by_init_parses(data):
    cfg = Config.parse(data.config_path.read_text(), "devid.toml")
    assert cfg == Config()


def _documented_keys() -> dict[str, str]:
    """key -> default, from the devid.toml table of docs/configuration.md."""
    from pathlib import Path
    text = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and "." in cells[0]:
            rows[cells[0].strip("`")] = cells[2].strip("`")
    return rows


def test_docs_list_every_devid_toml_key_with_its_default():
    import dataclasses
    from devid.gateway.app.settings import _OBJECT_SECTIONS, _SCHEMA
    documented = _documented_keys()
    cfg = Config()
    actual = {"organization.name": cfg.identity.organization, "organization.pen": cfg.identity.pen,
              "identity.device_type_oid": cfg.identity.device_type_oid,
              "identity.hardware_type_oid": cfg.identity.hardware_type_oid,
              "profiles.factory_validity_days": cfg.factory_days,
              "profiles.operational_validity_days": cfg.operational_days,
              "crl.validity_days": cfg.crl_days, "ca.passphrase_file": cfg.passphrase_file or "none",
              "registry.url": cfg.registry_url or "none",
              "registry.password_file": cfg.registry_password_file or "none"}
    assert set(actual) == {f"{s}.{k}" for s, keys in _SCHEMA.items() for k in keys}
    from datetime import timedelta
    from devid.gateway.service.budgets import Rate

    def as_toml(value):
        if isinstance(value, Rate):
            return f"{{burst = {value.burst}, interval = {value.interval:g}}}"
        if isinstance(value, timedelta):
            return int(value.total_seconds())
        return value
    for section, (cls_, _) in _OBJECT_SECTIONS.items():
        default = cls_()
        for f in dataclasses.fields(cls_):
            actual[f"{section}.{f.name}"] = as_toml(getattr(default, f.name))
    assert set(documented) == set(actual)
    for key, value in actual.items():
        assert documented[key] == str(value), key


def test_serve_takes_its_limits_from_devid_toml_and_flags_win(data):
    with data.config_path.open("a") as f:
        f.write("\n[gateway]\nmax_half_open = 20\n")
    # the file's max_half_open bounds the flag's per-address cap: the file was read
    line = _one_error_line(run_devid("serve", "--max-half-open-per-address", "30", data_dir=data.path),
                           "--max-half-open-per-address", "(20)")
    assert "devid.toml" not in line
    # the flag wins over the file's value
    line = _one_error_line(run_devid("serve", "--max-half-open", "40", "--max-half-open-per-address", "50",
                                     data_dir=data.path), "--max-half-open-per-address", "(40)")
    with data.config_path.open("a") as f:
        f.write("mtu = 100\n")
    _one_error_line(run_devid("serve", data_dir=data.path), "devid.toml: gateway.mtu must be", "256")


def test_budgets_from_devid_toml(data):
    from datetime import timedelta
    with data.config_path.open("a") as f:
        f.write("\n[budgets]\noutstanding_nonces = 2\nrenew = {interval = 30}\nsuperseded_grace = 120\n")
    data._config = None
    budgets = data.config.budgets
    assert budgets.outstanding_nonces == 2
    assert (budgets.renew.burst, budgets.renew.interval) == (5, 30)
    assert budgets.superseded_grace == timedelta(seconds=120)
    with data.config_path.open("a") as f:
        f.write("nonce = {burst = 0}\n")
    _one_error_line(run_devid("serve", data_dir=data.path), "budgets.nonce.burst", "devid.toml")


def test_the_gateway_applies_devid_toml(data):
    from datetime import timedelta
    from devid.gateway.app.server import Gateway, GatewayConfig
    with data.config_path.open("a") as f:
        f.write("\n[gateway]\nmtu = 1000\n\n[budgets]\nnonce = {burst = 2}\n\n"
                "[attestation_log]\nrefused_per_window = 7\nwindow = 600\n")
    data._config = None             # read again, as a new process would
    gw = Gateway(data, GatewayConfig(listen=[("127.0.0.1", 0)]))
    try:
        assert gw.engine.limits.mtu == 1000
        assert gw.enrollment.budgets.nonce.burst == 2
        assert (gw.attestation.log_budget.refused_per_window, gw.attestation.log_budget.window) == \
            (7, timedelta(seconds=600))
    finally:
        gw.registry.close()


@pytest.mark.sqlite_only       # the registry file in the data directory
def test_read_only_copy_with_pending_wal_is_an_error_not_stale_data(data, tmp_path):
    """A copy taken while a writer ran (its -wal holds committed transactions, no -shm), on a
    read-only mount: reading it as immutable would silently show stale data; it is an error."""
    import shutil
    writer = data.open_registry()
    try:
        run_devid("provision", "--count", "2", "--device-type", "t", "--out", tmp_path / "f", "--quiet",
                  data_dir=data.path, check=True)
        wal = data.db_path.with_name(data.db_path.name + "-wal")
        assert wal.stat().st_size > 0            # the writer keeps the WAL: the devices are only there
        copy = tmp_path / "copy"
        shutil.copytree(data.path, copy, ignore=shutil.ignore_patterns("*-shm"))
    finally:
        writer.close()
    with _read_only(copy):
        _one_error_line(run_devid("devices", "list", data_dir=copy), "registry.sqlite3-wal")


def test_init_removes_the_keys_an_interrupted_init_left(tmp_path):
    from devid.gateway.app.datadir import DataDir
    from .conftest import NOW
    d = DataDir(tmp_path / "d")
    stale = d.path / ".ca-init-4242-deadbeef"
    stale.mkdir(parents=True)
    (stale / "passphrase").write_text("left by a killed init\n")
    d.init(NOW)
    assert not stale.exists() and list(d.path.glob(".ca-init-*")) == []


def test_only_this_ca_s_gateway_certificates_may_seal_log_segments(data, registry, tmp_path):
    """A registry row of another CA's gateway certificate (as an interrupted init leaves) does not
    make that certificate's key one that may seal attestation log segments."""
    import sqlite3
    from cryptography.hazmat.primitives import serialization
    from devid.gateway.cli.attest import _trusted
    from devid.gateway.store.attestation_store import AttestationStore
    from devid.gateway.app.datadir import DataDir
    from .conftest import NOW
    other = DataDir(tmp_path / "other")
    other.init(NOW)
    src = sqlite3.connect(other.db_path)
    try:
        cols = [r[1] for r in src.execute("PRAGMA table_info(certificates)")]
        row = src.execute(f"SELECT {', '.join(cols)} FROM certificates WHERE profile = 'gateway'").fetchone()
    finally:
        src.close()
    with registry.transaction() as db:
        db.execute(f"INSERT INTO certificates ({', '.join(cols)}) VALUES ({','.join('?' * len(row))})", row)
    store = AttestationStore(registry)
    theirs = other.cert("gateway").public_bytes(serialization.Encoding.DER)
    ours = data.cert("gateway").public_bytes(serialization.Encoding.DER)
    assert theirs in store.gateway_certificates()
    trusted = _trusted(data, store)
    assert trusted(ours) is not None
    assert trusted(theirs) is None


@pytest.mark.parametrize("org", ['Bob\'s "Best" Devices', "C:\\Temp Org", "Zürich Ünits"])
def test_init_writes_any_organisation_name_as_valid_toml(tmp_path, org):
    """devid.toml is written with tomli-w: quotes and backslashes survive, once, into every subject."""
    from cryptography.x509.oid import NameOID
    from devid.gateway.app.datadir import DataDir
    from .conftest import NOW
    d = DataDir(tmp_path / "d")
    d.init(NOW, organization=org)
    assert Config.parse(d.config_path.read_text(), "devid.toml").identity.organization == org
    for name in ("root", "manufacturing", "operational", "gateway"):
        (attr,) = d.cert(name).subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        assert attr.value == org
