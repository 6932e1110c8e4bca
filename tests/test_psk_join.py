"""The PSK secret on a host that joins a shared registry (review finding 3): `devid init --join`
copies the first host's sealed ca/psk.secret, once it opens with the CA passphrase, so every host
derives the same PSKs; a secret that does not open refuses the join and leaves nothing behind."""

from __future__ import annotations

import json
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
