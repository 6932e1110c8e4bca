"""Shared fixtures: a real data directory with a real CA and registry, a fixed clock."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca.identity import fingerprint
from devid.gateway.app.datadir import DataDir

# One fixed instant per test run, passed to everything that takes a clock. It is the real time
# at start-up because OpenSSL (DTLS handshakes, `openssl verify`) checks validity on its own clock.
NOW = datetime.now(timezone.utc).replace(microsecond=0)
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    """An external program the tests need: missing means failure, never a skip."""
    for candidate in (BIN / name, shutil.which(name)):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail(f"required program {name!r} is not installed (run ./scripts/setup --test)")


@pytest.fixture
def now() -> datetime:
    return NOW


# -- the registry's engine ----------------------------------------------------------------------
# A test that uses the `data` fixture (directly or through `registry`, `ca`, `world`, ...) runs on
# SQLite, and also on PostgreSQL when its module says `pytestmark = pytest.mark.engines` (or every
# such test does, with DEVID_TEST_ENGINES=all; DEVID_TEST_ENGINES=postgresql: PostgreSQL only),
# except a test marked `sqlite_only` (it looks at SQLite's own machinery: triggers, PRAGMAs, WAL).
# On PostgreSQL each test gets a fresh schema of one throwaway cluster (tests/postgres_helpers.py),
# named by $DEVID_REGISTRY, so the CLI and `devid serve` subprocesses use it too.

ENGINES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc):
    if "registry_engine" not in metafunc.fixturenames:
        return
    chosen = os.environ.get("DEVID_TEST_ENGINES", "")
    if metafunc.definition.get_closest_marker("sqlite_only"):
        return
    if any("registry_engine" in str(m.args[0]) for m in metafunc.definition.iter_markers("parametrize")):
        return                      # the test names its engine itself
    if chosen == "all" or (chosen == "" and metafunc.definition.get_closest_marker("engines")):
        metafunc.parametrize("registry_engine", ENGINES, indirect=True)
    elif chosen in ENGINES:
        metafunc.parametrize("registry_engine", [chosen], indirect=True)


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL cluster for the session (started on first use): fails, never skips."""
    from .postgres_helpers import PostgresCluster
    cluster = PostgresCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def softhsm():
    """SoftHSM2's token directory for the session; SOFTHSM2_CONF names it for this process and
    every subprocess (a test makes its own token: `softhsm.new_token()`)."""
    import shutil as _shutil
    from .pkcs11_helpers import SoftHSM
    hsm = SoftHSM()
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    try:
        yield hsm
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
        _shutil.rmtree(hsm.root, ignore_errors=True)


@pytest.fixture
def token(softhsm):
    """A new SoftHSM2 token (label, PIN, SO PIN) for this test."""
    return softhsm.new_token()


@pytest.fixture
def registry_engine(request) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture
def registry_url(registry_engine, request, monkeypatch) -> str | None:
    """On PostgreSQL: a fresh schema's URL; on SQLite: None. $DEVID_REGISTRY is unset for the
    test either way (the `data` fixture's devid.toml names the registry)."""
    monkeypatch.delenv("DEVID_REGISTRY", raising=False)
    if registry_engine != "postgresql":
        return None
    return request.getfixturevalue("postgres").new_schema()


@pytest.fixture
def data(tmp_path, monkeypatch, registry_url) -> DataDir:
    """A data directory with a CA; on PostgreSQL made with `devid init --registry URL`'s code, so
    its devid.toml names the registry and every command, subprocesses too, uses it. Other data
    directories a test makes (another CA) get SQLite, unless it names a registry itself."""
    monkeypatch.delenv("DEVID_CA_PASSPHRASE", raising=False)
    d = DataDir(tmp_path / "data")
    if registry_url is not None:
        monkeypatch.setenv("DEVID_REGISTRY", registry_url)
    try:
        d.init(NOW, hostnames=["gw.example.net"])
    finally:
        monkeypatch.delenv("DEVID_REGISTRY", raising=False)
    return d.require()


@pytest.fixture
def registry(data):
    reg = data.open_registry()
    yield reg
    reg.close()


@pytest.fixture
def ca(data, registry):
    return data.authority(registry)


def make_csr(key=None, *, subject="ignored", extensions=(), der=True, algorithm=hashes.SHA256()):
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, subject)]))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical)
    csr = builder.sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM), key


def register_device(ca, serial="SN1", device_type="temperature-sensor", when=NOW):
    key = ec.generate_private_key(ec.SECP256R1())
    device, issued = ca.new_factory_identity(key.public_key(), serial, device_type, when)
    ca.store.register_devices([(device, issued.record)])
    return key, issued


def run_devid(*args, data_dir=None, env=None, input=None, check=False):
    e = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    e.update(env or {})
    if data_dir is not None:
        e["DEVID_DATA"] = str(data_dir)
    proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", *map(str, args)], capture_output=True,
                          env=e, input=input, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"devid {' '.join(map(str, args))} failed: {proc.stderr.decode()}")
    return proc


def ok(proc):
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def one_line_error(proc, *needles):
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def check_consistent(data: DataDir, out):
    """Registry and bundles agree one to one; each device has exactly one factory certificate."""
    reg = data.open_registry()
    try:
        devices = {d.serial: d for d in reg.list_devices()}
        bundles = {p.name for p in out.iterdir() if not p.name.startswith(".")} if out.exists() else set()
        assert bundles == set(devices), (sorted(bundles - set(devices))[:5], sorted(set(devices) - bundles)[:5])
        for serial in devices:
            certs = reg.certificates_for_device(serial)
            assert [c.profile for c in certs] == ["factory"]
            on_disk = x509.load_pem_x509_certificate((out / serial / "cert.pem").read_bytes())
            assert fingerprint(on_disk) == certs[0].fingerprint
            assert (out / serial / "key.pem").stat().st_size > 0
        return devices
    finally:
        reg.close()


@pytest.fixture
def world(data, ca, tmp_path):
    """A data directory with the test policy and devices of every policy case, provisioned."""
    from devid.gateway.factory.provisioning import provision
    from devid.gateway.app.server import POLICY_FILE
    from .gateway_helpers import POLICY
    (data.path / POLICY_FILE).write_text(POLICY)
    out = tmp_path / "factory"
    for dtype, prefix, n in (("temperature-sensor", "TS", 4), ("meter", "MT", 1), ("strict-sensor", "ST", 1),
                             ("legacy-sensor", "LG", 1), ("unlisted-type", "UN", 1)):
        provision(ca, count=n, device_type=dtype, out=out, serial_prefix=prefix, now=lambda: NOW,
                  manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"))
    return data, out


@pytest.fixture
def bundles(data, ca, tmp_path):
    """Three provisioned temperature sensors (factory bundles), no policy."""
    from devid.gateway.factory.provisioning import provision
    out = tmp_path / "factory"
    provision(ca, count=3, device_type="temperature-sensor", out=out, manufacturing_pem=data.cert_pem("manufacturing"),
              root_pem=data.cert_pem("root"), now=lambda: NOW)
    return out


def sql(registry, statement: str, params=()):
    """One statement on the registry, either engine, in its own transaction: the rows of a query,
    the row count of a change (for tests that look at or tamper with the tables directly)."""
    with registry.transaction() as db:
        cur = db.execute(statement, params)
        return cur.fetchall() if cur.description is not None else cur.rowcount


@pytest.fixture
def location(tmp_path, registry_url):
    """Where a test's own empty registry goes, either engine: a file, or a fresh schema's URL
    (open it with `devid.gateway.store.engines.open_registry(location, create=True)`)."""
    return registry_url or (tmp_path / "r.sqlite3")
