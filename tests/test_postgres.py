"""The registry on PostgreSQL, where it differs from SQLite: row locks instead of one write lock,
advisory locks for the log and migrations, errors translated in store/, URLs and passwords.
The shared behaviour runs on both engines in the modules marked `engines`."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca.errors import DeviceRevoked
from devid.ca.store import CertStatus, DeviceState
from devid.gateway.errors import RegistryError
from devid.gateway.store.engines import PostgresRegistry, open_registry, redact
from devid.gateway.store.schema import SCHEMA_VERSION
from devid.gateway.store.storage import FAILED, READ_ONLY, StorageError

from .conftest import NOW, make_csr, register_device, run_devid, one_line_error, sql
from .postgres_helpers import PostgresCluster


@pytest.fixture
def pg_data(postgres, tmp_path, monkeypatch):
    """A data directory whose registry is a fresh PostgreSQL schema."""
    from devid.gateway.app.datadir import DataDir
    monkeypatch.delenv("DEVID_CA_PASSPHRASE", raising=False)
    monkeypatch.setenv("DEVID_REGISTRY", postgres.new_schema())
    d = DataDir(tmp_path / "data")
    d.init(NOW, hostnames=["gw.example.net"])
    return d.require()


def test_redact_hides_the_password_wherever_it_is():
    assert redact("postgresql://devid:s3cret@db:5432/reg") == "postgresql://devid:***@db:5432/reg"
    assert redact("postgresql://devid@db/reg?password=s3cret&sslmode=require") == \
        "postgresql://devid:***@db/reg?sslmode=require"
    assert redact("postgresql://devid@db/reg") == "postgresql://devid@db/reg"
    # as libpq parses them: '#' and '?' inside a password, a keyword=value string, sslpassword
    for given in ("postgresql://u:pa#ss3cret@h:5432/db", "postgresql://u:s3cr?et@h:1/db",
                  "host=db user=devid password=hun3ter2 dbname=devid", "postgresql://u@h/d?sslpassword=k3ypass",
                  "postgresql://u@h/d?oauth_client_secret=k3ypass"):
        shown = redact(given)
        assert not any(s in shown for s in ("ss3cret", "s3cr", "hun3ter2", "k3ypass")), shown
        assert "***" in shown
    assert redact("mysql://x:s3cret@y/z") == "(a registry location that is not a valid PostgreSQL URL)"


def test_init_writes_the_url_and_refuses_one_with_a_password(postgres, tmp_path):
    url = postgres.new_schema()
    out = run_devid("init", "--registry", url, "--json", data_dir=tmp_path / "a")
    assert out.returncode == 0, out.stderr.decode()
    text = (tmp_path / "a" / "devid.toml").read_text()
    assert f'url = "{url}"' in text
    assert not (tmp_path / "a" / "registry.sqlite3").exists()
    secret = "pw-" + "9" * 12
    with_password = url.replace("devid@", f"devid:{secret}@")
    proc = run_devid("init", "--registry", with_password, data_dir=tmp_path / "b")
    err = one_line_error(proc, "must not hold a password", "password_file")
    assert secret not in err and secret not in proc.stdout.decode()
    assert not (tmp_path / "b").exists()
    # a second CA in a registry that holds one is refused: that is what --join is for
    proc = run_devid("init", "--registry", url, data_dir=tmp_path / "c")
    one_line_error(proc, "already holds a CA", "--join")


def test_the_registry_refuses_writes_when_opened_read_only(pg_data):
    reg = pg_data.open_registry(readonly=True)
    try:
        assert reg.count_devices() == {}
        with pytest.raises(StorageError) as err:
            reg.reserve_serial_block("X", 5)
        assert err.value.kind == READ_ONLY
    finally:
        reg.close()


def test_a_revocation_waits_for_an_issuance_to_the_same_device_and_then_revokes_its_certificate(pg_data):
    """On PostgreSQL (READ COMMITTED, no single write lock) an issuance holds the device's row from
    its check to its COMMIT; a revocation changes the device's row before its certificates, so it
    waits, then revokes the certificate just issued as well."""
    reg, other = pg_data.open_registry(), pg_data.open_registry()
    try:
        ca = pg_data.authority(reg)
        register_device(ca, "SN1")
        inside, release = threading.Event(), threading.Event()
        key = ec.generate_private_key(ec.SECP256R1())
        issued = ca.sign_device_certificate(key.public_key(), ca.profiles["operational"], "SN1", "t", NOW)

        def build(device):
            inside.set()
            release.wait(30)
            return issued.record

        issuer = threading.Thread(target=lambda: reg.record_for_device("SN1", build, supersede_profile="operational",
                                                                       new_state=DeviceState.ENROLLED))
        issuer.start()
        assert inside.wait(30)
        revoked: list = []
        revoker = threading.Thread(target=lambda: revoked.extend(other.revoke_device("SN1", "keyCompromise", NOW)))
        revoker.start()
        revoker.join(0.5)
        assert revoker.is_alive()           # waiting for the device row the issuance holds
        release.set()
        issuer.join(30)
        revoker.join(30)
        assert issued.record.serial in {c.serial for c in revoked}
        assert reg.get_certificate(issued.record.serial).status is CertStatus.REVOKED
        assert reg.get_device("SN1").state is DeviceState.REVOKED
    finally:
        reg.close()
        other.close()


def test_an_issuance_after_a_revocation_began_finds_the_device_revoked(pg_data):
    reg, other = pg_data.open_registry(), pg_data.open_registry()
    try:
        ca = pg_data.authority(reg)
        register_device(ca, "SN1")
        with other.transaction(durable=True) as db:      # a revocation in progress: the device row changed
            db.execute("UPDATE devices SET state = 'revoked' WHERE serial = ?", ("SN1",))
            result: list = []

            def issue():
                try:
                    ca.issue_operational(make_csr()[0], "SN1", NOW)
                    result.append("issued")
                except DeviceRevoked:
                    result.append("revoked")
            t = threading.Thread(target=issue)
            t.start()
            t.join(0.5)
            assert t.is_alive() and result == []    # waits for the revocation's COMMIT
        t.join(30)
        assert result == ["revoked"]
        assert [c.profile for c in reg.certificates_for_device("SN1")] == ["factory"]
    finally:
        reg.close()
        other.close()


def _open_new(url, q):
    reg = open_registry(url, create=True)
    q.put(reg.schema_version)
    reg.close()


def test_gateways_starting_together_on_an_empty_database_migrate_it_once(postgres):
    url = postgres.new_schema()
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_open_new, args=(url, q)) for _ in range(4)]
    for p in procs:
        p.start()
    versions = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert versions == [SCHEMA_VERSION] * 4
    reg = open_registry(url)
    try:
        assert sql(reg, "SELECT version FROM devid_schema") == [(SCHEMA_VERSION,)]
    finally:
        reg.close()


def test_a_lost_server_is_a_storage_error_and_the_registry_recovers_when_it_returns(tmp_path):
    cluster = PostgresCluster().start()
    try:
        url = cluster.new_database()
        reg = open_registry(url, create=True)
        try:
            assert reg.reserve_serial_block("X", 10) == 1
            cluster.stop_server()
            with pytest.raises(StorageError) as err:
                reg.reserve_serial_block("X", 10)
            assert err.value.kind == FAILED and "unavailable" in str(err.value)
            cluster.start_server()
            for _ in range(3):          # the pool drops the dead connection, then makes a new one
                try:
                    assert reg.reserve_serial_block("X", 10) == 11
                    break
                except StorageError:
                    continue
            else:
                pytest.fail("the registry did not recover after the server returned")
        finally:
            reg.close()
    finally:
        cluster.stop()


def test_an_unreachable_server_is_one_line_naming_it_without_the_password(tmp_path):
    from .postgres_helpers import free_tcp_port
    secret = "pw-" + "7" * 12
    url = f"postgresql://devid:{secret}@127.0.0.1:{free_tcp_port()}/nothing"
    with pytest.raises(StorageError) as err:
        PostgresRegistry(url, timeout=3)
    assert secret not in str(err.value) and "cannot connect" in str(err.value)
    proc = run_devid("--registry", url, "devices", "list", data_dir=tmp_path)
    assert secret not in proc.stderr.decode() + proc.stdout.decode()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr.decode()


def test_a_bad_registry_setting_is_one_line(tmp_path):
    proc = run_devid("--registry", "mysql://x@y/z", "devices", "list", data_dir=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr.decode()
    for given in ("host=db user=devid password=hun3ter2 dbname=devid", "postgresql://devid:s3cr?et@127.0.0.1:1/x",
                  "postgresql://devid:s3cr#et@127.0.0.1:1/x"):
        for args in (("--registry", given, "devices", "list", "--json"), ("--registry", given, "init", "--json"),
                     ("registry", "migrate", "--to", given, "--json")):
            proc = run_devid(*args, data_dir=tmp_path / "d")
            said = proc.stdout.decode() + proc.stderr.decode()
            assert proc.returncode != 0 and "Traceback" not in said
            assert "hun3ter2" not in said and "s3cr" not in said, (args, said)
    with pytest.raises(RegistryError):
        open_registry("postgresql://devid@127.0.0.1:1/x?sslmode=bogus")


def test_the_password_file_must_be_private_and_only_its_name_is_written(postgres, tmp_path):
    url = postgres.new_schema()
    secret = "pw-" + "5" * 12
    pw = tmp_path / "registry.password"
    pw.write_text(secret + "\n")
    pw.chmod(0o644)
    proc = run_devid("init", "--registry", url, "--registry-password-file", pw, data_dir=tmp_path / "a")
    err = one_line_error(proc, "chmod 600")
    assert secret not in err
    pw.chmod(0o600)
    out = run_devid("init", "--registry", url, "--registry-password-file", pw, "--json", data_dir=tmp_path / "a")
    assert out.returncode == 0, out.stderr.decode()
    text = (tmp_path / "a" / "devid.toml").read_text()
    assert f'password_file = "{pw}"' in text and secret not in text and secret not in out.stdout.decode()
    listed = run_devid("devices", "list", "--json", data_dir=tmp_path / "a")
    assert listed.returncode == 0 and secret not in listed.stdout.decode() + listed.stderr.decode()
    # without --registry the password file means nothing: refused rather than ignored
    proc = run_devid("init", "--registry-password-file", pw, data_dir=tmp_path / "b")
    one_line_error(proc, "--registry")


@pytest.mark.parametrize("registry_engine", ["postgresql"], indirect=True)
def test_nested_transactions_are_savepoints_and_a_swallowed_failure_commits_nothing(location):
    assert str(location).startswith("postgresql://")
    reg = open_registry(location, create=True)
    try:
        sql(reg, "CREATE TABLE t (x INTEGER PRIMARY KEY)")
        with reg.transaction() as db:
            db.execute("INSERT INTO t VALUES (1)")
            with pytest.raises(ZeroDivisionError):
                with reg.transaction() as inner:
                    inner.execute("INSERT INTO t VALUES (2)")
                    1 / 0
            with reg.transaction() as inner:          # a failed statement, caught: undone alone
                with pytest.raises(Exception):
                    with reg.transaction() as innermost:
                        innermost.execute("INSERT INTO t VALUES (1)")       # duplicate key
                inner.execute("INSERT INTO t VALUES (3)")
        assert sql(reg, "SELECT x FROM t ORDER BY x") == [(1,), (3,)]
        # a failed statement swallowed at the outer level: the transaction is not reported committed
        with pytest.raises(RegistryError, match="nothing was committed"):
            with reg.transaction() as db:
                db.execute("INSERT INTO t VALUES (4)")
                try:
                    db.execute("INSERT INTO t VALUES (1)")
                except Exception:
                    pass
        assert sql(reg, "SELECT x FROM t ORDER BY x") == [(1,), (3,)]
        before = reg.commits
        with reg.transaction(durable=True) as db:
            db.execute("INSERT INTO t VALUES (5)")
        assert reg.commits == before + 1
    finally:
        reg.close()


def test_an_init_killed_after_recording_in_a_shared_registry_is_taken_over(postgres, tmp_path):
    """The state an init killed between its durable record and its rename leaves: the registry
    names its CA, whose files are only in its staging directory. The next init of that data
    directory takes the registry back; another host's CA is never taken."""
    url = postgres.new_schema()
    d = tmp_path / "data"
    ok = run_devid("init", "--registry", url, data_dir=d)
    assert ok.returncode == 0, ok.stderr.decode()
    (d / "ca").rename(d / ".ca-init-4242-deadbeef")
    (d / "devid.toml").unlink()
    again = run_devid("init", "--registry", url, "--json", data_dir=d)
    assert again.returncode == 0, again.stderr.decode()
    assert not list(d.glob(".ca-init-*"))
    check = run_devid("registry", "check", "--json", data_dir=d)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    # a data directory with no staging directory of that CA cannot take a registry that holds one
    other = run_devid("init", "--registry", url, data_dir=tmp_path / "other")
    one_line_error(other, "already holds a CA")


def test_an_init_that_cannot_reach_the_registry_keeps_an_interrupted_inits_files(tmp_path):
    """The staging directory of an init killed after recording is the only copy of the CA the
    registry names: an init that cannot reach the registry must not remove it."""
    cluster = PostgresCluster().start()
    try:
        url = cluster.new_database()
        d = tmp_path / "data"
        assert run_devid("init", "--registry", url, data_dir=d).returncode == 0
        (d / "ca").rename(d / ".ca-init-4242-deadbeef")
        (d / "devid.toml").unlink()
        cluster.stop_server()
        one_line_error(run_devid("init", "--registry", url, data_dir=d), "cannot connect")
        assert [p.name for p in d.glob(".ca-init-*")] == [".ca-init-4242-deadbeef"]
        cluster.start_server()
        again = run_devid("init", "--registry", url, data_dir=d)
        assert again.returncode == 0, again.stderr.decode()
        # a secret of any name is refused for devid.toml
        proc = run_devid("init", "--registry", url + "?oauth_client_secret=k3ypass", data_dir=tmp_path / "x")
        err = one_line_error(proc, "must not hold a password")
        assert "k3ypass" not in err
    finally:
        cluster.stop()


@pytest.mark.parametrize("registry_engine", ["postgresql"], indirect=True)
def test_a_server_that_never_answers_is_cut_off_by_the_client_deadline(location):
    """A backend that keeps its connection but stops answering (SIGSTOP: no statement_timeout,
    no keepalive can end that wait) is cut off by the watchdog; the call fails as unavailable,
    and once the server answers again the registry works on a fresh connection."""
    import os
    import signal
    reg = PostgresRegistry(location, create=True, deadline=2.0)
    try:
        assert reg.reserve_serial_block("X", 1) == 1
        with reg.transaction() as db:       # the backend of the pool's connection
            pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(StorageError) as err:
                reg.reserve_serial_block("X", 1)
            assert err.value.kind == FAILED and reg.watchdog.cut == 1     # the client's deadline ended it
        finally:
            os.kill(pid, signal.SIGCONT)
        for _ in range(3):                  # the outage handling probes, then a fresh pool
            try:
                assert reg.reserve_serial_block("X", 1) in (2, 3)
                break
            except StorageError:
                continue
        else:
            pytest.fail("the registry did not recover")
    finally:
        reg.close()


def test_an_operational_error_of_one_request_is_busy_not_an_outage(postgres):
    """Too many clients, a program limit: that request's problem, a 5.03 'busy' worth a retry in
    a second; the connection and the server are fine, so no outage begins."""
    reg = open_registry(postgres.new_schema(), create=True)
    try:
        with pytest.raises(StorageError) as err:
            with reg.reading() as db:       # 54000: a program limit (an array too large)
                db.execute("SELECT array_fill(0, ARRAY[200000000, 200000000])")
        assert err.value.kind == "busy"
        assert reg._down is None and reg.reserve_serial_block("X", 1) == 1
    finally:
        reg.close()
