"""The PSK secret on a host that joins a shared registry (review finding 3): `devid init --join`
copies the first host's sealed ca/psk.secret, once it opens with the CA passphrase, so every host
derives the same PSKs; a secret that does not open refuses the join and leaves nothing behind."""

from __future__ import annotations

import json
import logging

import pytest
import shutil
import stat

from devid.gateway.app.datadir import DataDir

from .conftest import ok, one_line_error, run_devid


def test_join_copies_and_checks_the_psk_secret(postgres, tmp_path):
    url = postgres.new_schema("pskjoin")
    a, b, stray = tmp_path / "host-a", tmp_path / "host-b", tmp_path / "host-c"
    ok(run_devid("init", "--registry", url, data_dir=a))
    secret = DataDir(a).psk_secret(create=True)        # what the first `devid provision --psk` makes
    ca_copy = tmp_path / "ca-of-a"
    shutil.copytree(a / "ca", ca_copy)

    # a secret that does not open with the CA passphrase (another deployment's, or damaged)
    bad = tmp_path / "bad-ca"
    shutil.copytree(ca_copy, bad)
    sealed = (bad / "psk.secret").read_bytes()
    (bad / "psk.secret").write_bytes(sealed[:-8] + bytes(8))
    one_line_error(run_devid("init", "--join", url, "--ca-from", bad, data_dir=stray), "psk.secret")
    assert not stray.exists()

    joined = json.loads(ok(run_devid("init", "--join", url, "--ca-from", ca_copy, "--json", data_dir=b)))
    assert joined["psk_secret"] is True
    copied = b / "ca" / "psk.secret"
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600
    assert DataDir(b).psk_secret() == secret            # the same PSKs on both hosts
    assert secret not in copied.read_bytes() and secret.hex() not in json.dumps(joined)


def test_hosts_of_one_registry_cannot_use_different_psk_secrets(postgres, tmp_path, caplog):
    """Review 18b L2: the registry keeps a check of the PSK secret (ca/psk.secret_check) from the
    first host that uses one; a host without it makes none, a host with another one is refused,
    and a gateway with another one refuses PSK devices and says why."""
    from devid.ca import psk
    from devid.ca.errors import CAError
    from devid.gateway.app.server import PskSecretLoader

    url = postgres.new_schema("pskcheck")
    a, b = tmp_path / "host-a", tmp_path / "host-b"
    ok(run_devid("init", "--registry", url, data_dir=a))
    ok(run_devid("init", "--join", url, "--ca-from", a / "ca", data_dir=b))   # before any PSK secret
    assert not (b / "ca" / "psk.secret").exists()
    # host b's gateway runs before any PSK secret exists: no secret, nothing to say
    clock = [0.0]
    loader = PskSecretLoader(DataDir(b), monotonic=lambda: clock[0])
    assert loader() is None
    out = tmp_path / "out"
    ok(run_devid("provision", "--count", "1", "--device-type", "t", "--psk", "--out", out, data_dir=a))
    secret = DataDir(a).psk_secret()
    registry = DataDir(a).open_registry()
    try:
        assert registry.deployment()[psk.SECRET_CHECK_KEY] == psk.secret_check(secret)
    finally:
        registry.close()

    # host b has none: it does not make its own, and its gateway, which asks the registry again
    # every minute while it has none, says why once (review 18c L2, 18d L2)
    proc = run_devid("provision", "--count", "1", "--device-type", "t", "--psk", "--out", out, data_dir=b)
    one_line_error(proc, "psk.secret", "another host")
    assert not (b / "ca" / "psk.secret").exists()
    with caplog.at_level(logging.ERROR, logger="devid.gateway"):
        clock[0] = 30.0
        assert loader() is None                     # within the minute: a stat, no query
        for t in (61.0, 122.0):
            clock[0] = t
            with pytest.raises(CAError, match="missing, but this registry's PSK devices use a PSK secret"):
                loader()
    assert [r.getMessage() for r in caplog.records].count(
        f"PSK secret not usable: {b / 'ca' / 'psk.secret'}: missing, but this registry's PSK devices use a PSK "
        "secret: copy the first host's here") == 1
    caplog.clear()
    # nor does a host join without it, nor with another
    one_line_error(run_devid("init", "--join", url, "--ca-from", b / "ca", data_dir=tmp_path / "host-c"),
                   "no psk.secret")
    assert not (tmp_path / "host-c").exists()

    # host b with a secret of its own (made before the registry had a check): refused, by
    # provisioning and by the gateway (PSK devices refused, the reason logged, never the secret)
    other = DataDir(b)
    (b / "ca" / "psk.secret").write_bytes(psk.seal_secret(bytes(range(32)), other.passphrase()))
    (b / "ca" / "psk.secret").chmod(0o600)
    one_line_error(run_devid("provision", "--count", "1", "--device-type", "t", "--psk", "--out", out, data_dir=b),
                   "not the PSK secret of this registry")
    one_line_error(run_devid("init", "--join", url, "--ca-from", b / "ca", data_dir=tmp_path / "host-d"),
                   "not the PSK secret of this registry")
    assert not (tmp_path / "host-d").exists()
    with caplog.at_level(logging.ERROR, logger="devid.gateway"):
        with pytest.raises(CAError, match="not the PSK secret of this registry"):
            PskSecretLoader(other)()
    said = [r.getMessage() for r in caplog.records if "PSK secret not usable" in r.getMessage()]
    assert len(said) == 1 and "not the PSK secret of this registry" in said[0], said
    assert bytes(range(32)).hex() not in said[0]
    # with the first host's secret it is accepted
    shutil.copy2(a / "ca" / "psk.secret", b / "ca" / "psk.secret")
    assert PskSecretLoader(DataDir(b))() == secret
